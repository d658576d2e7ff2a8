"""``mptk-bench``: GPT training speed through mptk's own path, beside a plain-PyTorch GPT of the
same shape measured in the same run (mptk #10).

    mptk-bench --shape tiny                                  # CPU, seconds (tests use this)
    mptk-bench --shape 1p3b --steps 20 --warmup 5            # one GPU: model=gpt_1p3b, bf16
    mptk-bench --shape 1p3b --variants torch_compile,zero1_compile optim.lr=3e-4

Every variant runs in fresh processes (one per device; ``--nproc``): the mptk variants through
:func:`mptk.train.loop.setup` and :func:`mptk.train.loop.one_step`, exactly what ``mptk-train``
runs per step (DeepSpeed engine, megatron-core model, the recipe's data and loss); the
baselines through :class:`PlainGPT`, a self-contained ``nn.Module`` GPT with SDPA attention,
mixed precision by autocast and torch's fused AdamW, eager and ``torch.compile``d. Warm-up steps
(compilation, allocator growth, optimizer-state creation) are excluded from timing.

Output: one JSON line per variant on stdout (progress and worker logs on stderr): tokens/s, model
TFLOP/s per device (Megatron's formula, :func:`mptk.log.flops.step_flops`), MFU (over the GPU
table's peak; ``null`` on CPU), peak memory, mean seconds per phase (:mod:`mptk.log.phases`),
and the ratio of TFLOP/s to the compiled baseline of the same run. A failing variant prints a
line with ``error`` and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
    print(f"mptk-bench: {text}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- the plain baseline


def rope_tables(seq: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[seq, head_dim]`` of rotary embeddings (base 10000, halves rotated, as
    megatron-core's non-interleaved RoPE)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t``: ``[b, s, heads, d]``."""
    t1, t2 = t.chunk(2, dim=-1)
    rotated = torch.cat((-t2, t1), dim=-1)
    return t * cos[:, None].to(t.dtype) + rotated * sin[:, None].to(t.dtype)


class Block(nn.Module):
    """Pre-norm transformer layer with megatron's defaults: biases, LayerNorm/RMSNorm, GELU or
    SwiGLU, causal SDPA, grouped-query attention when asked."""

    def __init__(self, m):
        super().__init__()
        h, heads = m.hidden_size, m.num_attention_heads
        self.heads, self.groups, self.d = heads, m.num_query_groups or heads, h // heads
        ffn, self.swiglu = m.ffn_hidden_size or 4 * h, m.activation.value == "swiglu"
        norm = nn.RMSNorm if m.normalization.value == "RMSNorm" else nn.LayerNorm
        self.ln1, self.ln2 = norm(h), norm(h)
        self.qkv = nn.Linear(h, (heads + 2 * self.groups) * self.d)
        self.proj = nn.Linear(heads * self.d, h)
        self.fc1 = nn.Linear(h, ffn * (2 if self.swiglu else 1))
        self.fc2 = nn.Linear(ffn, h)

    def forward(self, x, rope):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(
            [self.heads * self.d, self.groups * self.d, self.groups * self.d], dim=-1)
        q, k, v = (t.view(b, s, -1, self.d) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                           is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        hidden = self.fc1(self.ln2(x))
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return x + self.fc2(hidden)


class PlainGPT(nn.Module):
    """The GPT recipe's shape (:class:`mptk.recipes.gpt.recipe.GPTConfig`) in plain PyTorch;
    ``forward`` returns the mean next-token cross-entropy (computed in fp32)."""

    def __init__(self, m):
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        rope = m.position_embedding.value == "rope"
        self.pos = None if rope else nn.Embedding(m.seq_length, m.hidden_size)
        self.rope = rope_tables(m.seq_length, m.hidden_size // m.num_attention_heads) if rope \
            else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        norm = nn.RMSNorm if m.normalization.value == "RMSNorm" else nn.LayerNorm
        self.ln_f = norm(m.hidden_size)
        self.head = None if m.tie_embeddings else nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=m.init_method_std)

    def to(self, *args, **kwargs):
        if self.rope is not None:
            self.rope = tuple(t.to(*args, **kwargs) for t in self.rope)
        return super().to(*args, **kwargs)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, self.rope)
        weight = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(self.ln_f(x), weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# ----------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, phases, device: torch.device, warmup: int, steps: int) -> dict:
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
    result = measure(lambda i: one_step(w, i)[0], w.phases, w.device, job["warmup"],
                     job["steps"])
    return {**result, "setup_s": setup_s, "device": str(w.device),
            "params_per_rank": parameter_count(w.engine.module),
            **figures(w.cfg, w.device, w.layout.world, w.cfg.train.global_batch_size,
                      result["step_time_s"])}


def torch_worker(env, job: dict) -> dict:
    """The plain-PyTorch baseline on one device: fp32 weights, autocast to the run's dtype,
    fused AdamW on CUDA, the same clipping, batch shape and per-device samples per step."""
    from mptk.config.schema import DType
    from mptk.parallel import groups
    from mptk.log.phases import Phases

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
    result = measure(step, phases, device, job["warmup"], job["steps"])
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


# ----------------------------------------------------------------------- processes


def _rank_main(fn, env, job: dict, out: Path) -> None:
    """A spawned rank: worker logs go to stderr (stdout carries only the JSON lines)."""
    os.dup2(2, 1)
    from mptk.parallel import groups
    from mptk.log.noise import quiet

    quiet()
    try:
        result = fn(env, job)
        (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which prints it
        (out / f"rank{env.rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    groups.finish(0)


def run_ranks(fn, world: int, job: dict, timeout: float) -> list[dict]:
    """``fn(env, job)`` on ``world`` fresh spawned ranks; their results in rank order, or
    ``RuntimeError`` naming the first failure (a traceback's last line) or the timeout."""
    from mptk.parallel.env import DistEnv
    from mptk.launch.local import free_port

    out, port = Path(tempfile.mkdtemp(prefix="mptk-bench-")), free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(fn, DistEnv(
        rank=r, local_rank=r, world_size=world, master_addr="127.0.0.1", master_port=port,
        launcher="spawn"), job, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    late = [p for p in procs if p.is_alive()]
    for p in late:
        p.kill()
        p.join()
    errors = [f.read_text().strip().splitlines()[-1] for f in sorted(out.glob("*.err"))]
    if errors or late:
        raise RuntimeError(errors[0] if errors else f"timed out after {timeout:.0f} s")
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"worker exit codes {[p.exitcode for p in procs]}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out, ignore_errors=True)
    return results


# ----------------------------------------------------------------------- the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mptk-bench", description="GPT training speed through mptk's own path beside a "
        "same-run plain-PyTorch GPT; one JSON line per variant on stdout.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                        help="model preset (Hydra overrides; more overrides may follow)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks (devices) per mptk variant; default: GPUs present, else 1")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every variant")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first step compiles/allocates)")
    return args


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
    if "error" in r:
        return f"{r['variant']:<15} ERROR {r['error']}"
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    ratio = f"{r['vs_baseline']:.2f}" if "vs_baseline" in r else "-"
    return (f"{r['variant']:<15} {r['tokens_per_s']:>12,.0f} tok/s {r['tflops_per_device']:>9.3f} "
            f"TFLOP/s  MFU {mfu}  x{ratio} of {r.get('baseline', '-')}  "
            f"{r['peak_mem_gib']:.2f} GiB  {r['step_time_s']:.3f} s/step")


def main(argv: list[str] | None = None) -> int:
    from mptk.config.load import ConfigError
    from mptk.log.noise import quiet

    quiet()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc or max(1, torch.cuda.device_count())
    variants = ordered(args.variants.split(","))
    try:
        if variants[-1] not in BASELINES:  # mptk variants read the recipe's data
            prepare_data(compose_variant(args, variants[-1], nproc))
    except ConfigError as err:
        say(f"error: {err}")
        return 2
    done: dict[str, dict] = {}
    for variant in variants:
        say(f"{variant}: {' '.join(VARIANTS[variant] or ['plain PyTorch GPT'])} ...")
        record = run_variant(args, variant, nproc)
        add_ratio(record, done)
        done[variant] = record
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")
        say(summary_line(record))
    say("summary (TFLOP/s are model FLOPs per device, Megatron's formula):")
    for record in done.values():
        say("  " + summary_line(record))
    return 1 if any("error" in r for r in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
