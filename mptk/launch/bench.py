"""``mptk-bench``'s measurements: GPT training speed through mptk's own path beside a
plain-PyTorch GPT of the same shape, measured in the same run (the command:
:mod:`mptk.cli.bench`).

Every variant runs in fresh processes (one per device, :func:`mptk.launch.runner.run`): the
mptk variants through :func:`mptk.train.loop.setup` and :func:`mptk.train.loop.one_step`,
exactly what ``mptk-train`` runs per step (DeepSpeed engine, megatron-core model, the recipe's
data and loss); the baselines through :class:`mptk.models.baseline.PlainGPT` with mixed
precision by autocast and torch's fused AdamW, eager and ``torch.compile``d. Warm-up steps
(compilation, allocator growth, optimizer-state creation) are excluded from timing.

A record per variant: tokens/s, model TFLOP/s per device (Megatron's formula,
:func:`mptk.log.flops.step_flops`), MFU (over the GPU table's peak; ``None`` on CPU), peak
memory, mean seconds per phase (:mod:`mptk.log.phases`), and the ratio of TFLOP/s to the
compiled baseline of the same run; a failing variant's record carries ``error``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from mptk.launch import runner

SHAPES = {
    "tiny": ["model=gpt_tiny", "model.num_layers=2", "model.hidden_size=64",
             "model.num_attention_heads=4", "model.seq_length=64", "model.vocab_size=512",
             "train.micro_batch_size=2", "data.max_chars=300000"],
    "1p3b": ["model=gpt_1p3b", "train.dtype=bf16", "train.micro_batch_size=4"],
}
"""``--shape``: Hydra overrides picking the model (positional overrides come after them)."""

COMMON = ["parallel=single", "log=disabled", "log.progress=false", "train.eval_interval=0",
          "train.save_interval=-1", "train.resume=none", "debug.hang_timeout_s=0",
          "optim.warmup_steps=1"]
"""Every variant: no model parallelism, no W&B, no eval, no checkpoints, a 1-step LR warm-up."""

VARIANTS = {
    "torch_compile": None, "torch_eager": None,  # PlainGPT baselines (see BASELINES)
    "zero0": ["zero=zero0"],
    "zero1": ["zero=zero1"],
    "zero1_fused": ["zero=zero1", "optim.fused=true"],
    "zero1_compile": ["zero=zero1", "optim.fused=true", "train.compile=true"],
    "zero0_compile": ["zero=zero0", "optim.fused=true", "train.compile=true"],
    "zero1_compile_loss": ["zero=zero1", "optim.fused=true", "train.compile=true",
                           "train.compile_loss=true"],
    "local": ["zero=zero0", "model.attention=local"],
}
"""Variant name -> overrides after the shape's and the user's (None: a PlainGPT baseline)."""

BASELINES = {"torch_compile": True, "torch_eager": False}
"""Baseline name -> whether the PlainGPT is ``torch.compile``d."""

DEFAULT_VARIANTS = "torch_compile,torch_eager,zero0,zero1,zero1_fused,zero1_compile"


def say(text: str) -> None:
    """Progress on stderr (stdout carries only the JSON lines)."""
    print(f"mptk-bench: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, phases, device: torch.device, warmup: int, steps: int) -> dict:
    """Run ``step(i)`` (returns the loss) ``warmup`` times untimed, then ``steps`` times timed;
    seconds per step, mean phase seconds of the timed steps, peak memory, first/last loss."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    began, losses = time.perf_counter(), []
    for i in range(warmup):
        losses.append(step(i))
        phases.step_done()
    _sync(device)
    warm_s, _ = time.perf_counter() - began, phases.window()
    began = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(i))
        phases.step_done()
    _sync(device)
    seconds = (time.perf_counter() - began) / steps
    losses = [float(x) for x in losses]
    return {"step_time_s": seconds, "warmup_s": warm_s, **peak_memory(device),
            "phases_s": {k: v for k, v in phases.window().items() if v > 0},
            "loss_first": losses[0], "loss_last": losses[-1]}


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: the CUDA allocator's, or the CPU's max RSS."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_kind": "cuda_max_allocated"}
    import resource

    return {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "mem_kind": "cpu_max_rss"}


def figures(cfg, device: torch.device, world: int, samples_per_step: int, seconds: float) -> dict:
    """tokens/s (all devices), model TFLOP/s per device and MFU (Megatron's formula)."""
    from mptk.log import flops

    peak = flops.peak_tflops(cfg.cluster, device)
    out = flops.throughput(flops.step_flops(cfg.model, samples_per_step), seconds, world, peak)
    return {"tokens_per_s": samples_per_step * cfg.model.seq_length / seconds,
            "tflops_per_device": out["tflops_per_device"], "mfu": out.get("mfu"),
            "peak_tflops": peak, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def mptk_worker(env, job: dict) -> dict:
    """One rank of an mptk variant: ``setup`` and ``one_step`` of ``mptk-train``."""
    from mptk.train.loop import one_step, parameter_count, setup

    began = time.perf_counter()
    w = setup(job["cfg"], env)
    setup_s = time.perf_counter() - began
    result = time_steps(lambda i: one_step(w, i)[0], w.phases, w.device, job["warmup"],
                     job["steps"])
    return {**result, "setup_s": setup_s, "device": str(w.device),
            "params_per_rank": parameter_count(w.engine.module),
            **figures(w.cfg, w.device, w.layout.world, w.cfg.train.global_batch_size,
                      result["step_time_s"])}


def torch_worker(env, job: dict) -> dict:
    """The plain-PyTorch baseline on one device: fp32 weights, autocast to the run's dtype,
    fused AdamW on CUDA, the same clipping, batch shape and per-device samples per step."""
    from mptk.config.schema import DType
    from mptk.log.phases import Phases
    from mptk.models.baseline import PlainGPT
    from mptk.parallel import groups

    cfg, compiled = job["cfg"], BASELINES[job["variant"]]
    device = groups.resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    if cfg.train.dtype is DType.fp16:
        raise ValueError("the plain-PyTorch baseline runs fp32 or bf16 (fp16 needs a loss scaler)")
    torch.manual_seed(cfg.train.seed)
    began = time.perf_counter()
    with device:  # initialised where it runs (a 1.3B model's CPU init takes many seconds)
        model = PlainGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                            betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    if compiled:
        model.compile()
    grad_acc = cfg.train.global_batch_size // (cfg.train.micro_batch_size * job["world"])
    phases = Phases(cuda=device.type == "cuda")
    step = _torch_step(model, opt, cfg, device, grad_acc, phases)
    setup_s = time.perf_counter() - began
    result = time_steps(step, phases, device, job["warmup"], job["steps"])
    samples = cfg.train.micro_batch_size * grad_acc
    return {**result, "setup_s": setup_s, "device": str(device),
            "params_per_rank": sum(p.numel() for p in model.parameters()),
            **figures(cfg, device, 1, samples, result["step_time_s"])}


def _torch_step(model, opt, cfg, device, grad_acc: int, phases):
    """The baseline's optimizer step ``step(i) -> loss tensor`` (no host sync inside)."""
    from mptk.config.schema import DType

    micro, seq, vocab = cfg.train.micro_batch_size, cfg.model.seq_length, cfg.model.vocab_size
    half = cfg.train.dtype is DType.bf16
    generator = torch.Generator().manual_seed(cfg.train.seed)

    def step(i: int) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(grad_acc):
            with phases.span("data"):
                batch = torch.randint(vocab, (micro, seq + 1), generator=generator)
                batch = batch.to(device, non_blocking=True)
            with phases.span("forward"), torch.autocast(device.type, torch.bfloat16,
                                                         enabled=half):
                loss = model(batch[:, :-1], batch[:, 1:]) / grad_acc
            with phases.span("backward"):
                loss.backward()
            total += loss.detach()
        with phases.span("optimizer"):
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total

    return step


# ----------------------------------------------------------------------- variants


def run_ranks(fn, world: int, job: dict, timeout: float) -> list[dict]:
    """``fn(env, job)`` on ``world`` fresh ranks (their stdout goes to stderr); their results
    in rank order, or :class:`mptk.launch.runner.RankError` naming the failure or the
    timeout."""
    return runner.run(fn, world, job, timeout=timeout, stdout_to_stderr=True,
                      name="mptk-bench-rank")


def compose_variant(args, variant: str, nproc: int):
    """The variant's RunConfig: common + shape + batch + user overrides + the variant's."""
    from mptk.config.load import compose

    head = COMMON + SHAPES[args.shape] + [f"launcher.nproc_per_node={nproc}"]
    micro = compose(head + args.overrides).train.micro_batch_size
    steps = [f"train.steps={args.warmup + args.steps}",
             f"train.global_batch_size={micro * nproc}"]
    cfg = compose(head + steps + args.overrides + (VARIANTS[variant] or []))
    cfg.run_dir = tempfile.mkdtemp(prefix=f"mptk-bench-{variant}-")
    return cfg


def prepare_data(cfg) -> None:
    """Tokenize once in this process (every variant's ranks then read the cache)."""
    if cfg.data.source.value in ("stdlib", "files"):
        from mptk.data import tokens

        tokens.prepare(cfg.data, cfg.model.vocab_size, log=say)


def run_variant(args, variant: str, nproc: int) -> dict:
    """One variant's JSON record (``error`` set when it failed)."""
    from mptk.train.preflight import PreflightError, preflight

    cfg = compose_variant(args, variant, nproc)
    baseline = variant in BASELINES
    record = {"variant": variant, "impl": "torch" if baseline else "mptk",
              "overrides": VARIANTS[variant] or [], "world": 1 if baseline else nproc,
              "dtype": cfg.train.dtype.value, "steps": args.steps, "warmup": args.warmup,
              "shape": shape_of(cfg)}
    job = {"cfg": cfg, "variant": variant, "steps": args.steps, "warmup": args.warmup,
           "world": nproc}
    began = time.perf_counter()
    try:
        preflight(cfg, record["world"], torch.cuda.is_available())
        ranks = run_ranks(torch_worker if baseline else mptk_worker, record["world"], job,
                          args.timeout)
        record |= ranks[0] | {"peak_mem_gib": max(r["peak_mem_gib"] for r in ranks)}
    except (PreflightError, RuntimeError, OSError) as err:
        record["error"] = str(err)
    record["wall_s"] = time.perf_counter() - began
    return record


def shape_of(cfg) -> dict:
    """The model and batch shape of a variant's record."""
    m = cfg.model
    return {"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
            "seq": m.seq_length, "vocab": m.vocab_size, "attention": m.attention.value,
            "micro_batch": cfg.train.micro_batch_size, "global_batch": cfg.train.global_batch_size}


def add_ratio(record: dict, done: dict) -> None:
    """TFLOP/s per device over the compiled baseline's (else the eager one's) of this run."""
    for name in ("torch_compile", "torch_eager"):
        base = done.get(name, {})
        if base.get("tflops_per_device") and record.get("tflops_per_device"):
            record["baseline"] = name
            record["vs_baseline"] = record["tflops_per_device"] / base["tflops_per_device"]
            return


def ordered(variants: list[str]) -> list[str]:
    """Baselines first, so that every later line carries its ratio."""
    return [v for v in variants if v in BASELINES] + [v for v in variants if v not in BASELINES]


def summary_line(r: dict) -> str:
    """One variant's line of the human summary on stderr."""
    if "error" in r:
        return f"{r['variant']:<15} ERROR {r['error']}"
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "-"
    return (f"{r['variant']:<15} {r['tokens_per_s']:>12,.0f} tok/s {r['tflops_per_device']:>9.3f} "
            f"TFLOP/s  MFU {mfu}  x{ratio} of {r.get('baseline', '-')}  "
            f"{r['peak_mem_gib']:.2f} GiB  {r['step_time_s']:.3f} s/step")


def run_variants(args, variants: list[str], nproc: int,
                 emit: Callable[[dict], None]) -> dict[str, dict]:
    """Every variant, baselines first; ``emit(record)`` as each one ends (ratio added)."""
    done: dict[str, dict] = {}
    for variant in ordered(variants):
        say(f"{variant}: {' '.join(VARIANTS[variant] or ['plain PyTorch GPT'])} ...")
        record = run_variant(args, variant, nproc)
        add_ratio(record, done)
        done[variant] = record
        emit(record)
    return done
