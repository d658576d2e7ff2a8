"""A worker's whole run: groups, data, model, engine, the loop, metrics, a clean end."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mptk.train.preflight import Layout, preflight
from mptk.config.schema import RunConfig
from mptk.parallel import groups
from mptk.parallel.env import DistEnv
from mptk.log.metrics import Metrics
from mptk.log.noise import quiet
from mptk.config import registry
from mptk.models import partition
from mptk.compat.cpu import device_scope
from mptk.train.pipeline import (attach_timers, pipeline_evaluate, pipeline_step,
                                 theoretical_bubble)
from mptk.train.step import evaluate, time_grad_reduce, train_step
from mptk.exitcodes import REQUEUE_EXIT_CODE  # mptk #4: checkpoints, resume, signals
from mptk.checkpoint import core as checkpoint
from mptk.train import signals
from mptk.log import profile, ranklog, report, watchdog  # mptk #7: rank logs, NaN check, hang watchdog
from mptk.log import flops, progress  # mptk #7: TFLOP/s + MFU, progress bar and ETA
from mptk.log.phases import Phases, across_ranks  # mptk #7: per-phase timers, straggler


@dataclass(slots=True)
class Worker:
    """Everything a rank holds while training."""

    cfg: RunConfig
    layout: Layout
    device: torch.device
    recipe: registry.Recipe
    data: object
    engine: object
    metrics: Metrics
    start_step: int = 0
    """Optimizer steps already done (restored from a checkpoint)."""
    extra: dict = field(default_factory=dict)
    """Per-step figures a step function adds to the metrics row (e.g. the pipeline bubble)."""
    phases: Phases = field(default_factory=Phases)
    """This rank's phase spans (mptk #7), read at every log step."""
    step_flops: float = 0.0
    """Model FLOPs of one optimizer step, all ranks (Megatron's formula)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of this device for MFU (None on CPU / unknown GPUs)."""


def say(text: str) -> None:
    """Rank 0 speaks on the console."""
    ranklog.say(text, groups.rank() == 0)  # mptk #7: also into run_dir/logs/rank_<r>.log


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
    return registry.ModelContext(
        tp=layout.tp, pp=layout.pp, dtype=cfg.train.dtype, vp_stage=vp_stage,
        pre_process=groups.is_first_stage(vp_stage), post_process=groups.is_last_stage(vp_stage),
        stage_layers=list(layout.stage_layers) or None, batch_p2p=backend != "gloo")


def build_model(recipe: registry.Recipe, cfg: RunConfig, layout: Layout, device,
                backend: str) -> torch.nn.Module:
    """This rank's model: the whole model at pp=1, its stage at pp>1, and with vpp>1 a
    ModuleList of its chunks (built under the CPU device scope: tied embeddings at pp>1 are
    synchronised with a CUDA-assuming all-reduce during construction)."""
    stages = [None] if layout.vpp == 1 else list(range(layout.vpp))
    with device_scope():
        chunks = [recipe.build(cfg.model, model_context(cfg, layout, vp, backend)).to(device)
                  for vp in stages]
    from mptk.models import speed  # mptk #10: parameter dtype, train.compile
    speed.apply(chunks, cfg)
    return chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)


def setup(cfg: RunConfig, env: DistEnv, prepare_model=None) -> Worker:
    """Process groups, data, model and DeepSpeed engine for this rank.

    ``prepare_model(model)``, if given, runs before DeepSpeed takes the model (tests load
    reference weights there).
    """
    from mptk.engine import deepspeed as ds

    layout = preflight(cfg, env.world_size, torch.cuda.is_available())
    device = groups.resolve_device(cfg.train.device)
    backend = groups.resolve_backend(cfg.launcher.backend, device)
    groups.init(env, layout.tp, layout.pp, device, backend, cfg.train.seed, layout.vpp)
    cfg.run_dir = agree_run_dir(cfg.run_dir)
    ranklog.setup(cfg.run_dir, groups.rank())  # mptk #7
    say(f"layout tp={layout.tp} pp={layout.pp} dp={layout.dp} grad_acc={layout.grad_acc} "
        f"world={layout.world} on {device.type} ({backend}) launcher={env.launcher}; run dir {cfg.run_dir}")
    recipe = registry.get(cfg.model.recipe)
    data = rank_zero_first(lambda: recipe.data(cfg, layout, log=say))
    model = build_model(recipe, cfg, layout, device, backend)
    if prepare_model is not None:
        prepare_model(model)
    plan = checkpoint.prepare(cfg, layout, model)  # mptk #4: pick resume ckpt / init_from weights
    say(f"model {cfg.model.recipe}: {parameter_count(model):,} parameters on this rank")
    if layout.pp > 1:
        say("pipeline stages (layers per virtual stage): " + str(list(layout.stage_layers)))
        say("\n" + partition.format_rows(partition.describe(
            cfg.model, layout.pp, layout.vpp, list(layout.stage_layers),
            cfg.train.micro_batch_size, layout.tp, layout.grad_acc)))
    engine = ds.initialize(model, cfg, layout)
    phases = Phases(cuda=device.type == "cuda")  # mptk #7
    time_grad_reduce(engine, phases)
    if layout.pp > 1:
        attach_timers(engine, phases)
    start = checkpoint.restore(engine, plan, cfg.run_dir)  # mptk #4: optimizer, RNG, step
    metrics = Metrics(cfg, groups.rank() == 0, printer=ranklog.info, layout=layout,
                      rank_printer=ranklog.info)  # mptk #7
    return Worker(cfg, layout, device, recipe, data, engine, metrics, start, phases=phases,
                  step_flops=flops.step_flops(cfg.model, cfg.train.global_batch_size),
                  peak_tflops=flops.peak_tflops(cfg.cluster, device))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
    record = {"step": step, "steps": w.cfg.train.steps, "loss": loss, "lr": lr,
              "grad_norm": norm, f"{w.recipe.units}_per_s": units / seconds,
              **flops.throughput(w.step_flops, seconds, w.layout.world, w.peak_tflops),
              "step_time_s": seconds, **memory(w.device), **loss_scale(w.engine)}
    if w.layout.pp > 1:
        record["bubble_theory"] = theoretical_bubble(w.layout.pp, w.layout.vpp, w.layout.grad_acc)
    return record


def batch_ids(w: Worker, step: int) -> dict:
    """This rank's global sample ids of (0-based) ``step``, one list per micro-batch."""
    from mptk.data.order import global_samples

    ids = [global_samples(step, m, w.cfg.train.micro_batch_size, w.layout.grad_acc,
                          groups.dp_rank(), w.layout.dp) for m in range(w.layout.grad_acc)]
    return {"dp_rank": groups.dp_rank(), "global_samples": ids}


def one_step(w: Worker, step: int) -> tuple[float, float]:
    """pp=1: the engine runs micro-batches itself; pp>1: megatron's pipeline schedule."""
    if w.layout.pp > 1:
        return pipeline_step(w.engine, w.recipe, w.data, step, w.layout.grad_acc, w.device,
                             w.cfg, stats=w.extra, phases=w.phases)
    return train_step(w.engine, w.recipe, w.data, step, w.layout.grad_acc, w.device, w.phases)


def one_eval(w: Worker) -> dict:
    if w.layout.pp > 1:
        return pipeline_evaluate(w.engine, w.recipe, w.data, w.device, w.cfg)
    return evaluate(w.engine, w.recipe, w.data, w.device)


def should_eval(cfg: RunConfig, step: int) -> bool:
    interval = cfg.train.eval_interval
    return step == cfg.train.steps or (interval > 0 and step % interval == 0)


def train(w: Worker) -> bool:
    """The loop: steps, a metrics line every ``log_interval``, held-out eval, checkpoints.
    Returns True when a stop signal ended it early (after a checkpoint)."""
    cfg = w.cfg
    dog = watchdog.Watchdog(cfg.debug.hang_timeout_s, cfg.run_dir, groups.rank()).start()  # mptk #7
    prof = profile.Window(cfg.profile, cfg.run_dir, groups.rank())  # mptk #7
    bar = progress.Bar(cfg.train.steps, w.start_step, cfg.log.progress and groups.rank() == 0)
    try:
        return _steps(w, dog, prof, bar.start())
    finally:
        bar.stop()
        dog.stop()
        prof.close()


def log_extras(w: Worker, step: int, elapsed_s: float) -> dict:
    """What a log step adds (mptk #7): phase times over ranks (a collective) and the ETA."""
    extras = across_ranks(w.phases.window()) if w.cfg.log.phase_timers else {}
    eta = progress.eta_seconds(step - w.start_step, elapsed_s, w.cfg.train.steps - step)
    return extras | ({"eta_s": eta} if eta is not None else {})


def _steps(w: Worker, dog, prof, bar) -> bool:
    cfg, began = w.cfg, time.perf_counter()
    for step in range(w.start_step, cfg.train.steps):
        watchdog.test_hang(step + 1, groups.rank())  # mptk #7: test hook (MPTK_TEST_HANG_*)
        start, lr = time.perf_counter(), w.engine.get_lr()[0]
        prof.begin(step)  # mptk #7: torch.profiler window (profile.*)
        loss, norm = one_step(w, step)
        loss = watchdog.test_nan(step + 1, loss)  # mptk #7: test hook (MPTK_TEST_NAN_AT_STEP)
        watchdog.check_finite(cfg.debug, step + 1, groups.rank(), loss, norm, cfg.run_dir,
                              lambda: batch_ids(w, step))  # mptk #7
        record = row(w, step + 1, loss, norm, lr, time.perf_counter() - start)
        prof.end(step)  # mptk #7 (after the timing: writing the trace is not step time)
        record.update(w.extra)
        w.extra.clear()
        w.phases.step_done()
        if should_eval(cfg, step + 1):
            record.update(one_eval(w))
        log_now = (step + 1) % cfg.train.log_interval == 0 or "eval_loss" in record
        if log_now:  # mptk #7: phase min/max + straggler (all ranks), ETA
            record.update(log_extras(w, step + 1, time.perf_counter() - began))
        w.metrics.log(record, console=log_now)
        bar.update(step + 1)
        if checkpoint.maybe_save(w, step + 1):  # mptk #4: saves when due; True after a signal
            return True
        dog.beat(step + 1)  # mptk #7
    return False


def run(cfg: RunConfig, env: DistEnv) -> None:
    """Entry of every worker; ends the process (see :func:`groups.finish`)."""
    quiet()
    signals.install()  # mptk #4: SIGTERM/SIGUSR1 -> finish the step, save, exit 3
    code = 1
    try:
        worker = setup(cfg, env)
        stopped = train(worker)
        worker.metrics.close()
        if groups.rank() == 0:  # mptk #7: run_dir/report.png (never fails the run)
            report.write(cfg.run_dir)
        if stopped:  # mptk #4
            say(f"stopped by a signal; checkpoint saved; exit {REQUEUE_EXIT_CODE} (requeue)")
            code = REQUEUE_EXIT_CODE
        else:
            say(f"done: {cfg.train.steps} steps; metrics in {cfg.run_dir}/metrics.jsonl")
            code = 0
    finally:
        groups.finish(code) if code in (0, REQUEUE_EXIT_CODE) else _abort(code)


def _abort(code: int) -> None:
    """On failure: print the traceback, then exit without waiting on peers."""
    import os
    import sys
    import traceback

    traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)
