"""One worker's run, owned by a :class:`Trainer`.

:func:`setup` builds everything once: process groups, data, the model, the DeepSpeed engine,
the step strategy (:class:`~mptk.train.step.EngineStep` at pp=1,
:class:`~mptk.train.pipeline.PipelineStep` at pp>1, chosen here and never re-tested) and the
checkpoint to resume from. :meth:`Trainer.fit` is then the policy, per step:
step -> metrics row -> held-out eval when due -> log -> save / stop.
Fault-injection test hooks fire at named points through :class:`~mptk.train.faults.Faults`.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from mptk.compat.cpu import device_scope
from mptk.config import registry
from mptk.config.schema import RunConfig
from mptk.exitcodes import REQUEUE_EXIT_CODE
from mptk.log import flops, profile, progress, ranklog, report, watchdog
from mptk.log.memory import Recorder, report_peaks
from mptk.log.metrics import Metrics
from mptk.log.phases import Phases, across_ranks
from mptk.models import init, moe
from mptk.parallel import groups
from mptk.parallel.env import DistEnv
from mptk.plan import partition
from mptk.train import resume
from mptk.train.faults import Faults
from mptk.train.pipeline import PipelineStep
from mptk.train.preflight import Layout, preflight
from mptk.train.step import EngineStep


class StepStrategy(Protocol):
    """How one optimizer step and one evaluation run on this rank (pp=1 or pipeline)."""

    def train(self, step: int) -> tuple[float, float]:
        """Optimizer step ``step`` (0-based): (loss averaged over micro-batches and dp, norm)."""

    def evaluate(self) -> dict:
        """Held-out metrics (``eval_loss`` plus the recipe's summary), equal on every rank."""

    def figures(self) -> dict:
        """Extra figures of the last step for its metrics row (e.g. the pipeline bubble)."""


@dataclass(slots=True)
class Worker:
    """Everything a rank holds while training."""

    cfg: RunConfig
    layout: Layout
    device: torch.device
    recipe: registry.Recipe
    data: object
    engine: Any
    """The DeepSpeed engine (duck-typed)."""
    metrics: Metrics
    stepper: StepStrategy
    """The step strategy, chosen once at setup from ``layout.pp``."""
    start_step: int = 0
    """Optimizer steps already done (restored from a checkpoint)."""
    phases: Phases = field(default_factory=Phases)
    """This rank's phase spans, read at every log step."""
    step_flops: float = 0.0
    """Model FLOPs of one optimizer step, all ranks (Megatron's formula)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of this device for MFU (None on CPU / unknown GPUs)."""
    moe: Any = None
    """A MoE model's :class:`mptk.models.moe.MoEStats` (aux loss, expert load), read at log steps."""


def say(text: str) -> None:
    """Rank 0 speaks on the console; every rank also writes it to run_dir/logs/rank_<r>.log."""
    ranklog.say(text, groups.rank() == 0)


def agree_run_dir(run_dir: str) -> str:
    """Rank 0's run dir for everyone (under torchrun each rank's Hydra picks its own time)."""
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_zero_first(fn):
    """Run ``fn`` on rank 0 first (it fills caches), then on the others."""
    if groups.rank() == 0:
        result = fn()
        dist.barrier()
        return result
    dist.barrier()
    return fn()


def model_context(cfg: RunConfig, layout: Layout, vp_stage, backend: str) -> registry.ModelContext:
    """What a recipe's builder needs to know about this rank's part of the model."""
    return registry.ModelContext(
        tp=layout.tp, pp=layout.pp, dtype=cfg.train.dtype, vp_stage=vp_stage,
        pre_process=groups.is_first_stage(vp_stage), post_process=groups.is_last_stage(vp_stage),
        stage_layers=list(layout.stage_layers) or None, batch_p2p=backend != "gloo",
        sp=layout.sp, recompute=cfg.train.recompute, recompute_method=cfg.train.recompute_method,
        recompute_layers=cfg.train.recompute_layers)


def build_model(recipe: registry.Recipe, cfg: RunConfig, layout: Layout, device,
                backend: str) -> torch.nn.Module:
    """This rank's model: the whole model at pp=1, its stage at pp>1, and with vpp>1 a
    ModuleList of its chunks (built under the CPU device scope: tied embeddings at pp>1 are
    synchronised with a CUDA-assuming all-reduce during construction)."""
    stages = [None] if layout.vpp == 1 else list(range(layout.vpp))
    with device_scope(), init.deferred():
        chunks = [recipe.build(cfg.model, model_context(cfg, layout, vp, backend)).to(device)
                  for vp in stages]
        init.initialise(chunks, cfg.train.seed)  # the same weights at every layout
    from mptk.models import speed  # parameter dtype and train.compile act on the built chunks

    speed.apply(chunks, cfg)
    return chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())


def choose_step(cfg: RunConfig, layout: Layout, engine, recipe, data, device,
                phases: Phases) -> StepStrategy:
    """The step strategy of this run: megatron's pipeline schedule at pp>1, else the engine."""
    if layout.pp > 1:
        return PipelineStep(engine, recipe, data, layout, device, cfg, phases)
    from mptk.engine.deepspeed import mptk_clips

    return EngineStep(engine, recipe, data, layout.grad_acc, device, phases,
                      clip=cfg.optim.grad_clip if mptk_clips(cfg, layout) else 0.0)


def describe_model(cfg: RunConfig, layout: Layout, model: torch.nn.Module) -> None:
    """Rank 0 prints the parameter count and, at pp>1, the stage balance."""
    say(f"model {cfg.model.recipe}: {parameter_count(model):,} parameters on this rank")
    if layout.pp > 1:
        say("pipeline stages (layers per virtual stage): " + str(list(layout.stage_layers)))
        say("\n" + partition.format_rows(partition.describe(
            cfg.model, layout.pp, layout.vpp, list(layout.stage_layers),
            cfg.train.micro_batch_size, layout.tp, layout.grad_acc)))


def setup(cfg: RunConfig, env: DistEnv, prepare_model=None) -> Worker:
    """Process groups, data, model, DeepSpeed engine and step strategy for this rank.

    ``prepare_model(model)``, if given, runs before DeepSpeed takes the model (tests load
    reference weights there).
    """
    from mptk.engine import deepspeed as ds

    layout = preflight(cfg, env.world_size, torch.cuda.is_available())
    device = groups.resolve_device(cfg.train.device)
    backend = groups.resolve_backend(cfg.launcher.backend, device)
    groups.init(env, layout.tp, layout.pp, device, backend, cfg.train.seed, layout.vpp,
                cp=layout.cp, ep=layout.ep)
    cfg.run_dir = agree_run_dir(cfg.run_dir)
    ranklog.setup(cfg.run_dir, groups.rank())
    # cp and ep are named only when they split sequences / experts (the tp/pp/dp line users grep)
    split = "".join(f"{n}={d} " for n, d in (("cp", layout.cp), ("ep", layout.ep)) if d > 1)
    say(f"layout tp={layout.tp} pp={layout.pp} {split}dp={layout.dp} "
        f"grad_acc={layout.grad_acc} "
        f"world={layout.world} on {device.type} ({backend}) launcher={env.launcher}; "
        f"run dir {cfg.run_dir}")
    recipe = registry.get(cfg.model.recipe)
    data = rank_zero_first(lambda: recipe.data(cfg, layout, log=say))
    model = build_model(recipe, cfg, layout, device, backend)
    if prepare_model is not None:
        prepare_model(model)
    # Resume or init_from weights must be chosen before DeepSpeed wraps the model.
    plan = resume.prepare(cfg, layout, model)
    describe_model(cfg, layout, model)
    engine = ds.initialize(model, cfg, layout)
    phases = Phases(cuda=device.type == "cuda")
    stepper = choose_step(cfg, layout, engine, recipe, data, device, phases)
    # Optimizer state, RNG and the step count need the engine.
    start = resume.restore(engine, plan, cfg.run_dir)
    # Ranks other than 0 print their metrics lines into their own rank log only.
    metrics = Metrics(cfg, groups.rank() == 0, printer=ranklog.info, layout=layout,
                      rank_printer=ranklog.info, start_step=start)
    return Worker(cfg, layout, device, recipe, data, engine, metrics, stepper, start,
                  phases=phases,
                  step_flops=flops.step_flops(cfg.model, cfg.train.global_batch_size),
                  peak_tflops=flops.peak_tflops(cfg.cluster, device), moe=moe_stats(cfg, model))


def moe_stats(cfg: RunConfig, model: torch.nn.Module):
    """Expert-load and aux-loss counters of a MoE model (None for a dense one)."""
    experts = getattr(cfg.model, "num_experts", None)
    if not experts:
        return None
    return moe.MoEStats([model], cfg.model.num_layers, experts,
                        partial_over=groups.tp_size() * groups.cp_size())


def one_step(w: Worker, step: int) -> tuple[float, float]:
    """Optimizer step ``step`` (0-based) through the run's step strategy: (loss, grad norm)."""
    return w.stepper.train(step)


def one_eval(w: Worker) -> dict:
    """Held-out metrics through the run's step strategy."""
    return w.stepper.evaluate()


def rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(device: torch.device) -> dict:
    """GPU: allocated / reserved / peak allocated MiB; CPU: peak RSS MiB."""
    if device.type == "cuda":
        return {"mem_allocated_mb": torch.cuda.memory_allocated() / 2**20,
                "mem_reserved_mb": torch.cuda.memory_reserved() / 2**20,
                "mem_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"rss_mb": rss_mb()}


def loss_scale(engine) -> dict:
    """fp16's dynamic loss scale (DeepSpeed keeps it on the optimizer); nothing otherwise."""
    if not engine.fp16_enabled():
        return {}
    value = getattr(engine.optimizer, "loss_scale", getattr(engine.optimizer, "cur_scale", None))
    return {"loss_scale": float(value)} if value is not None else {}


def row(w: Worker, step: int, loss: float, norm: float, lr: float, seconds: float) -> dict:
    """One metrics.jsonl record (``step`` counts completed optimizer steps)."""
    units = w.cfg.train.global_batch_size * w.recipe.units_per_sample(w.cfg.model)
    return {"step": step, "steps": w.cfg.train.steps, "loss": loss, "lr": lr,
            "grad_norm": norm, f"{w.recipe.units}_per_s": units / seconds,
            **flops.throughput(w.step_flops, seconds, w.layout.world, w.peak_tflops),
            "step_time_s": seconds, **memory(w.device), **loss_scale(w.engine)}


def batch_ids(w: Worker, step: int) -> dict:
    """This rank's global sample ids of (0-based) ``step``, one list per micro-batch."""
    from mptk.data.order import global_samples

    ids = [global_samples(step, m, w.cfg.train.micro_batch_size, w.layout.grad_acc,
                          groups.dp_rank(), w.layout.dp) for m in range(w.layout.grad_acc)]
    return {"dp_rank": groups.dp_rank(), "global_samples": ids}


def should_eval(cfg: RunConfig, step: int) -> bool:
    """Held-out eval after completed step ``step``: every ``eval_interval`` and at the end."""
    interval = cfg.train.eval_interval
    return step == cfg.train.steps or (interval > 0 and step % interval == 0)


def log_extras(w: Worker, step: int, elapsed_s: float) -> dict:
    """What a log step adds: phase times over ranks (a collective) and the ETA."""
    extras = across_ranks(w.phases.window()) if w.cfg.log.phase_timers else {}
    eta = progress.eta_seconds(step - w.start_step, elapsed_s, w.cfg.train.steps - step)
    experts = w.moe.read() if w.moe is not None else {}  # a collective
    return extras | experts | ({"eta_s": eta} if eta is not None else {})


class Trainer:
    """Owns one worker's run: :meth:`setup` builds it once, :meth:`fit` runs the loop,
    :meth:`close` ends it and names the exit code."""

    def __init__(self, worker: Worker, faults: Faults | None = None):
        self.w = worker
        self.faults = faults if faults is not None else Faults.from_env(groups.rank())

    @classmethod
    def setup(cls, cfg: RunConfig, env: DistEnv, prepare_model=None) -> Trainer:
        """A trainer over a freshly set-up worker (see :func:`setup`)."""
        return cls(setup(cfg, env, prepare_model))

    def fit(self) -> bool:
        """Every remaining step. True when a stop signal ended the run early (after a
        checkpoint); False when it ran to ``train.steps``."""
        w = self.w
        with self._instruments() as (dog, prof, mem, bar):
            began = time.perf_counter()
            for step in range(w.start_step, w.cfg.train.steps):
                record = self.step(step, prof, mem)
                if should_eval(w.cfg, step + 1):
                    record.update(w.stepper.evaluate())
                self.log(record, time.perf_counter() - began)
                bar.update(step + 1)
                if self.save_or_stop(step + 1):
                    return True
                dog.beat(step + 1)
        return False

    @contextlib.contextmanager
    def _instruments(self) -> Iterator[tuple]:
        """The hang watchdog, the profiler window, the memory snapshot window and the progress
        bar, for the loop's span."""
        cfg, rank = self.w.cfg, groups.rank()
        dog = watchdog.Watchdog(cfg.debug.hang_timeout_s, cfg.run_dir, rank).start()
        prof = profile.Window(cfg.profile, cfg.run_dir, rank)
        mem = Recorder(cfg.debug, cfg.run_dir, rank, self.w.device, self.w.start_step, say)
        bar = progress.Bar(cfg.train.steps, self.w.start_step, cfg.log.progress and rank == 0)
        try:
            yield dog, prof, mem, bar.start()
        finally:
            bar.stop()
            dog.stop()
            prof.close()
            mem.close()

    def step(self, step: int, prof, mem) -> dict:
        """Optimizer step ``step`` (0-based), its NaN check and its metrics row."""
        w, done = self.w, step + 1
        self.faults.before_step(done)
        start, lr = time.perf_counter(), w.engine.get_lr()[0]
        prof.begin(step)
        mem.begin(step)
        with mem.guard(step):  # an out-of-memory error leaves a snapshot
            loss, norm = w.stepper.train(step)
        loss = self.faults.loss(done, loss)
        watchdog.check_finite(w.cfg.debug, done, groups.rank(), loss, norm, w.cfg.run_dir,
                              lambda: batch_ids(w, step))
        record = row(w, done, loss, norm, lr, time.perf_counter() - start)
        prof.end(step)  # after the timing: writing the trace is not step time
        mem.end(step)
        record.update(w.stepper.figures())
        w.phases.step_done()
        return record

    def log(self, record: dict, elapsed_s: float) -> None:
        """Write the row; on a console step (every ``log_interval``, or with an eval) first add
        the phase min/max over ranks, the straggler and the ETA."""
        w, done = self.w, record["step"]
        console = done % w.cfg.train.log_interval == 0 or "eval_loss" in record
        if console:
            record.update(log_extras(w, done, elapsed_s))
        w.metrics.log(record, console=console)

    def save_or_stop(self, done: int) -> bool:
        """Checkpoint when due or when any rank got a stop signal; True means stop now."""
        self.faults.after_step(done)
        return resume.maybe_save(self.w, done)

    def close(self, stopped: bool) -> int:
        """Flush metrics, write the report, say how the run ended; the worker's exit code."""
        cfg = self.w.cfg
        self.w.metrics.close()
        report_peaks(self.w.device, groups.rank(), say)  # a collective, on every rank
        if groups.rank() == 0:
            report.write(cfg.run_dir)  # run_dir/report.png; never fails the run
        if stopped:
            say(f"stopped by a signal; checkpoint saved; exit {REQUEUE_EXIT_CODE} (requeue)")
            return REQUEUE_EXIT_CODE
        say(f"done: {cfg.train.steps} steps; metrics in {cfg.run_dir}/metrics.jsonl")
        return 0
