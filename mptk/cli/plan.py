"""``mptk-plan``: memory per GPU, step time, tokens/s and MFU of a layout, offline.

    mptk-plan model=gpt_1p3b train.dtype=bf16 cluster.nodes=4 cluster.gpus_per_node=8 cluster.gpu=h100
    mptk-plan model=gpt_1p3b train.dtype=bf16 --nodes 64 --gpus-per-node 8 --gpu h100 --search --why
    mptk-plan parallel.tp=2 launcher.nproc_per_node=4 --measure     # predicted vs held bytes

The same Hydra overrides as ``mptk-train``. Exit code 0: fits (or the search found a layout);
1: does not fit (or nothing fits); 2: bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from mptk.plan import RESERVE, Plan, plan
from mptk.plan.hardware import EFFICIENCY, GPUS, Cluster, GiB, gpu
from mptk.plan.memory import total_params

OWN = ("gpu", "nodes", "gpus_per_node")
"""``cluster.*`` keys the planner reads itself when the schema has no field for them."""


class UsageError(ValueError):
    """Bad planner input, one line."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mptk-plan", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for mptk-train")
    p.add_argument("--nodes", type=int, help="nodes (else cluster.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (else cluster.gpus_per_node)")
    p.add_argument("--gpu", help=f"GPU type (else cluster.gpu): {', '.join(GPUS)}")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit")
    p.add_argument("--why", action="store_true", help="with --search: why layouts were dropped")
    p.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    p.add_argument("--all-knobs", action="store_true",
                   help="also search knobs mptk's config cannot set yet (recompute, sequence parallel)")
    p.add_argument("--efficiency", type=float, default=EFFICIENCY,
                   help=f"achievable fraction of peak FLOP/s (default {EFFICIENCY})")
    p.add_argument("--reserve-gib", type=float, default=RESERVE / GiB,
                   help="per-GPU memory kept back for CUDA context, NCCL, fragmentation")
    p.add_argument("--measure", action="store_true",
                   help="build the DeepSpeed engine per ZeRO stage on launcher.nproc_per_node "
                        "local ranks (CPU or GPU, as train.device) and compare predicted with "
                        "held model-state bytes")
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages for --measure")
    p.add_argument("--out", default="plan_measure.jsonl", help="--measure appends JSON rows here")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


# --------------------------------------------------------------------------- input


def _schema_cluster_fields() -> set[str]:
    from mptk.config.schema import RunConfig

    for f in dataclasses.fields(RunConfig):
        if f.name == "cluster" and f.default_factory is not dataclasses.MISSING:
            return {g.name for g in dataclasses.fields(f.default_factory())}
    return set()


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(overrides for compose, planner-own ``cluster.*`` values the schema cannot hold)."""
    known, keep, own = _schema_cluster_fields(), [], {}
    for item in overrides:
        key, eq, value = item.lstrip("+").partition("=")
        name = key.removeprefix("cluster.")
        if eq and key.startswith("cluster.") and name in OWN and name not in known:
            own[name] = value
        else:
            keep.append(item)
    return keep, own


def _pick(*values: Any) -> Any:
    return next((v for v in values if v not in (None, "", 0)), None)


def cluster_of(cfg: Any, args: argparse.Namespace, own: dict[str, str]) -> Cluster:
    """Flags first, then planner-own overrides, then the config's ``cluster`` group."""
    node = getattr(cfg, "cluster", None)
    nodes = _pick(args.nodes, own.get("nodes"), getattr(node, "nodes", None), 1)
    per_node = _pick(args.gpus_per_node, own.get("gpus_per_node"), getattr(node, "gpus_per_node", None))
    name = _pick(args.gpu, own.get("gpu"), getattr(node, "gpu", None))
    if not per_node:
        raise UsageError("GPUs per node unknown: give --gpus-per-node G or cluster.gpus_per_node=G")
    if not name:
        raise UsageError(f"GPU type unknown: give --gpu or cluster.gpu=<one of {', '.join(GPUS)}>")
    try:
        return Cluster(nodes=int(nodes), gpus_per_node=int(per_node), gpu=gpu(str(name)))
    except KeyError as err:
        raise UsageError(err.args[0]) from err


def compose_run(overrides: list[str]) -> Any:
    from mptk.config.load import compose

    return compose(overrides)


# --------------------------------------------------------------------------- output


def console() -> Console:
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, width=150)


def _g(x: float) -> str:
    return f"{x / GiB:,.2f}"


def describe(cfg: Any, p: Plan) -> str:
    c, cl, tr = p.choice, p.cluster, p.training
    dtype = {2: cfg.train.dtype.value, 4: "fp32"}[tr.w]
    return (f"{cfg.model.recipe} {total_params(p.shape) / 1e9:.3g}B params, seq {p.shape.seq}, "
            f"global batch {tr.global_batch}, {dtype}, {tr.optimizer}\n"
            f"layout tp={c.tp} pp={c.pp} vpp={c.vpp} dp={c.dp}, ZeRO-{c.zero}, micro {c.micro} x "
            f"{c.grad_acc(tr.global_batch)} accumulation, recompute {c.recompute}, "
            f"sequence parallel {'on' if c.sp else 'off'}; {cl.nodes} x {cl.gpus_per_node} {cl.gpu.name}")


def activation_formula(c, flash: bool) -> str:
    """Korthikanti et al.'s per-layer term in use (SDPA keeps no s x s scores: +5as/h dropped)."""
    if c.recompute == "full":
        return "2sbh/t (layer input)" if c.sp else "2sbh (layer input)"
    scores = not flash and c.recompute == "none"
    if c.sp or c.tp == 1:
        return f"sbh(34{'+5as/h' if scores else ''}){'/t' if c.tp > 1 else ''}"
    return f"sbh(10+24/t{'+5as/(ht)' if scores else ''})"


def buffer_note(c, tr) -> str:
    if c.zero == 0:
        return "flattened gradients for the dp all-reduce (<= bucket)" if c.dp > 1 else "none at dp 1"
    text = f"reduce bucket {tr.reduce_bucket:,} elements{' x 2 (overlap_comm)' if tr.overlap_comm else ''}"
    text += " + 2 gathered layers" if c.zero == 3 else ""
    return text + (" + fp32 copy of the gradient partition" if c.zero >= 2 and tr.w < 4 else "")


def notes(p: Plan) -> dict[str, str]:
    """How each memory item was counted."""
    c, tr, m = p.choice, p.training, p.memory
    part = f"/ dp {c.dp}" if c.dp > 1 else "(dp 1)"
    opt = "SGD momentum 4 B" if tr.optimizer == "sgd" else "AdamW moments 8 B + step"
    act = activation_formula(c, p.shape.flash)
    return {
        "weights": f"{tr.w} B x {m.params:,} params{' ' + part if c.zero == 3 else ''}",
        "gradients": f"{tr.w} B x params{' ' + part if c.zero >= 2 else ''}",
        "fp32 master": "none (fp32 run at ZeRO-0)" if not m.states.master else
                       f"4 B x params{' ' + part if c.zero >= 1 else ''}",
        "optimizer states": f"{opt}{' ' + part if c.zero >= 1 else ''}",
        "activations": f"{act} x {m.layers} layers x {m.micro_batches:.2f} micro-batches "
                       f"(s={p.shape.seq}, b={c.micro}, h={p.shape.hidden}, t={c.tp})",
        "logits + loss": "fp32 logits and softmax, last stage",
        "DeepSpeed buffers": buffer_note(c, tr),
        "CUDA context / NCCL / fragmentation": "assumed (--reserve-gib)",
    }


def memory_table(p: Plan) -> Table:
    t = Table(title=f"memory per GPU (pipeline rank {p.memory.rank})")
    for col, just in (("item", "left"), ("GiB", "right"), ("how", "left")):
        t.add_column(col, justify=just)
    how = notes(p)
    for name, value in p.memory.rows():
        t.add_row(name, _g(value), how.get(name, ""))
    t.add_row("[bold]total[/]", f"[bold]{_g(p.memory.total())}[/]", "")
    t.add_row("GPU memory", _g(p.cluster.gpu.memory), p.cluster.gpu.name)
    return t


def time_table(p: Plan) -> Table:
    t = Table(title="step time")
    for col, just in (("part", "left"), ("ms", "right"), ("share", "right")):
        t.add_column(col, justify=just)
    for name, value in p.timing.rows():
        t.add_row(name, f"{value * 1e3:,.1f}", f"{value / p.timing.step:.1%}")
    t.add_row("[bold]step[/]", f"[bold]{p.timing.step * 1e3:,.1f}[/]", "100%")
    return t


def stage_table(cfg: Any, p: Plan) -> str:
    """Each pipeline stage's layers, parameters, FLOPs and activations (pp > 1)."""
    from mptk.models import partition

    c = p.choice
    rows = partition.describe(cfg.model, c.pp, c.vpp, cfg.parallel.layers_per_stage, c.micro,
                              c.tp, c.grad_acc(cfg.train.global_batch_size))
    return "pipeline stages\n" + partition.format_rows(rows)


def show_plan(out: Console, cfg: Any, p: Plan) -> None:
    out.print(describe(cfg, p))
    if p.choice.pp > 1:
        out.print(stage_table(cfg, p), markup=False, highlight=False)
    out.print(memory_table(p))
    out.print(time_table(p))
    tm = p.timing
    out.print(f"{tm.tokens_per_s:,.0f} tokens/s, {tm.samples_per_s:,.2f} samples/s, MFU {tm.mfu:.1%}, "
              f"pipeline bubble {tm.bubble_share:.1%} of the step")
    out.print(f"[{'green' if p.fits else 'red'}]{p.verdict()}[/]")


def plan_json(p: Plan) -> dict:
    return {"choice": dataclasses.asdict(p.choice), "fits": p.fits, "verdict": p.verdict(),
            "memory": {**dict(p.memory.rows()), "total": p.memory.total(), "rank": p.memory.rank},
            "timing": dataclasses.asdict(p.timing)}


def search_table(rows: list[Plan]) -> Table:
    t = Table(title="layouts that fit, fastest first")
    for col in ("#", "tp", "pp", "vpp", "dp", "ZeRO", "micro", "acc", "recompute", "sp",
                "GiB", "step s", "tokens/s", "MFU"):
        t.add_column(col, justify="right")
    for i, p in enumerate(rows, 1):
        c, tm = p.choice, p.timing
        t.add_row(str(i), str(c.tp), str(c.pp), str(c.vpp), str(c.dp), str(c.zero), str(c.micro),
                  str(c.grad_acc(p.training.global_batch)), c.recompute, "on" if c.sp else "off",
                  _g(p.memory.total()), f"{tm.step:.3f}", f"{tm.tokens_per_s:,.0f}", f"{tm.mfu:.1%}")
    return t


def why_table(rows: list) -> Table:
    t = Table(title="why layouts were dropped")
    for col in ("reason", "layouts", "example", "preflight says"):
        t.add_column(col)
    for reason, count, c, lines in rows:
        example = f"tp={c.tp} pp={c.pp} vpp={c.vpp} dp={c.dp}"
        if reason.startswith("does not fit"):
            example += f" ZeRO-{c.zero} micro={c.micro}"
        t.add_row(reason, f"{count:,}", example, "\n".join(lines) or "-")
    return t


# --------------------------------------------------------------------------- modes


def run_plan(out: Console, cfg: Any, cluster: Cluster, args: argparse.Namespace) -> int:
    p = plan(cfg, cluster, efficiency=args.efficiency, reserve=args.reserve_gib * GiB)
    if args.json:
        print(json.dumps(plan_json(p), indent=1))
    else:
        show_plan(out, cfg, p)
    return 0 if p.fits else 1


def run_search(out: Console, cfg: Any, cluster: Cluster, args: argparse.Namespace) -> int:
    from mptk.plan import search as s

    start = time.perf_counter()
    result = s.search(cfg, cluster, s.knobs_of(cfg, args.all_knobs), args.top, args.efficiency,
                      args.reserve_gib * GiB)
    seconds = time.perf_counter() - start
    best = result.ranked[: args.top]
    if args.json:
        print(json.dumps([{**plan_json(p), "overrides": s.overrides(cfg, p.choice, cluster)}
                          for p in best], indent=1))
        return 0 if best else 1
    out.print(f"{result.evaluated:,} layouts evaluated on {cluster.world:,} GPUs in {seconds:.2f} s; "
              f"{len(result.ranked):,} fit")
    _show_found(out, cfg, cluster, best, result)
    if args.why:
        out.print(why_table(s.why(cfg, result, cluster.world)))
    return 0 if best else 1


def _show_found(out: Console, cfg: Any, cluster: Cluster, best: list[Plan], result) -> None:
    from mptk.plan import search as s

    if not best:
        smallest = result.too_big[0] if result.too_big else None
        out.print("[red]no layout fits[/]" + (f"; the smallest needs {_g(smallest.memory.total())} "
                                               f"GiB per GPU" if smallest else ""))
        return
    out.print(search_table(best))
    out.print("overrides to paste:")
    for i, p in enumerate(best, 1):
        out.print(f"{i:>3}  " + " ".join(s.overrides(cfg, p.choice, cluster)), soft_wrap=True)


def run_measure(out: Console, cfg: Any, args: argparse.Namespace) -> int:
    from mptk.plan import measure

    stages = [int(x) for x in args.stages.split(",") if x.strip()]
    rows = measure.run(cfg, cfg.launcher.nproc_per_node, stages)
    measure.write_rows(rows, args.out)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        out.print(measure_table(rows))
        out.print(f"rows appended to {args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


def measure_table(rows: list[dict]) -> Table:
    t = Table(title="model-state bytes per rank: predicted / held by the DeepSpeed engine")
    for col in ("rank", "tp", "dp", "ZeRO", "params", "grads", "master", "optim", "total", "exact"):
        t.add_column(col, justify="right")
    for r in rows:
        pair = [f"{r['predicted'][k]:,.0f} / {r['measured'][k]:,.0f}"
                for k in ("params", "grads", "master", "optim", "total")]
        t.add_row(str(r["rank"]), str(r["tp"]), str(r["dp"]), str(r["zero"]), *pair,
                  "yes" if r["exact"] else f"no ({r['rel_err']:.2%})")
    return t


def run(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    overrides, own = split_overrides(args.overrides)
    cfg = compose_run(overrides)
    out = console()
    if args.measure:
        return run_measure(out, cfg, args)
    cluster = cluster_of(cfg, args, own)
    return (run_search if args.search else run_plan)(out, cfg, cluster, args)


def main(argv: list[str] | None = None) -> None:
    from mptk.config.load import ConfigError
    from mptk.log.noise import quiet

    quiet()
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, UsageError) as err:
        print(f"mptk-plan: error: {err}", file=sys.stderr, flush=True)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
