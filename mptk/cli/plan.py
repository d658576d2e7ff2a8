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

from mptk.cli import plan_report as report
from mptk.config.schema import ClusterConfig, RunConfig
from mptk.plan import RESERVE, plan
from mptk.plan.hardware import EFFICIENCY, GPUS, Cluster, GiB, gpu

OWN = ("gpu", "nodes", "gpus_per_node")
"""``cluster.*`` keys the planner reads itself when the schema has no field for them."""


class UsageError(ValueError):
    """Bad planner input, one line."""


def parser() -> argparse.ArgumentParser:
    """Hydra overrides plus the planner's own flags."""
    p = argparse.ArgumentParser(prog="mptk-plan", description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for mptk-train")
    p.add_argument("--nodes", type=int, help="nodes (else cluster.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (else cluster.gpus_per_node)")
    p.add_argument("--gpu", help=f"GPU type (else cluster.gpu): {', '.join(GPUS)}")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit")
    p.add_argument("--why", action="store_true", help="with --search: why layouts were dropped")
    p.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    p.add_argument("--all-knobs", action="store_true",
                   help="no-op, kept for old scripts: --search now always varies train.recompute "
                        "and parallel.sp with the other knobs")
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
    """The keys ``ClusterConfig`` has (those compose, the others the planner keeps)."""
    return {f.name for f in dataclasses.fields(ClusterConfig)}


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


def cluster_of(cfg: RunConfig, args: argparse.Namespace, own: dict[str, str]) -> Cluster:
    """Flags first, then planner-own overrides, then the config's ``cluster`` group."""
    node = cfg.cluster
    nodes = _pick(args.nodes, own.get("nodes"), node.nodes, 1)
    per_node = _pick(args.gpus_per_node, own.get("gpus_per_node"), node.gpus_per_node)
    name = _pick(args.gpu, own.get("gpu"), node.gpu)
    if not per_node:
        raise UsageError("GPUs per node unknown: give --gpus-per-node G or cluster.gpus_per_node=G")
    if not name:
        raise UsageError(f"GPU type unknown: give --gpu or cluster.gpu=<one of {', '.join(GPUS)}>")
    try:
        return Cluster(nodes=int(nodes), gpus_per_node=int(per_node), gpu=gpu(str(name)))
    except KeyError as err:
        raise UsageError(err.args[0]) from err


def compose_run(overrides: list[str]) -> RunConfig:
    """The typed run config, as ``mptk-train`` composes it."""
    from mptk.config.load import compose

    return compose(overrides)


# --------------------------------------------------------------------------- modes


def run_plan(out: Console, cfg: RunConfig, cluster: Cluster, args: argparse.Namespace) -> int:
    """The configured layout: 0 fits, 1 does not."""
    p = plan(cfg, cluster, efficiency=args.efficiency, reserve=args.reserve_gib * GiB)
    if args.json:
        print(json.dumps(report.plan_json(p), indent=1))
    else:
        report.show_plan(out, cfg, p)
    return 0 if p.fits else 1


def run_search(out: Console, cfg: RunConfig, cluster: Cluster, args: argparse.Namespace) -> int:
    """``--search``: 0 when some layout fits, 1 when none does."""
    from mptk.plan import search as s

    start = time.perf_counter()
    result = s.search(cfg, cluster, s.knobs_of(cfg), args.top, args.efficiency,
                      args.reserve_gib * GiB)
    seconds = time.perf_counter() - start
    best = result.ranked[: args.top]
    if args.json:
        print(json.dumps(report.search_json(cfg, cluster, best), indent=1))
        return 0 if best else 1
    out.print(f"{result.evaluated:,} layouts evaluated on {cluster.world:,} GPUs in {seconds:.2f} s; "
              f"{len(result.ranked):,} fit")
    report.show_found(out, cfg, cluster, best, result)
    if args.why:
        out.print(report.why_table(report.why(cfg, result, cluster.world)))
    return 0 if best else 1


def run_measure(out: Console, cfg: RunConfig, args: argparse.Namespace) -> int:
    """``--measure``: 0 when every predicted row equals the bytes held."""
    from mptk.launch import measure

    stages = [int(x) for x in args.stages.split(",") if x.strip()]
    rows = measure.run(cfg, cfg.launcher.nproc_per_node, stages)
    measure.write_rows(rows, args.out)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        out.print(report.measure_table(rows))
        out.print(f"rows appended to {args.out}")
    return 0 if all(r["exact"] for r in rows) else 1


def run(argv: list[str]) -> int:
    """Parse, compose, run one mode; the exit code."""
    args = parser().parse_intermixed_args(argv)
    overrides, own = split_overrides(args.overrides)
    cfg = compose_run(overrides)
    out = report.console()
    if args.measure:
        return run_measure(out, cfg, args)
    cluster = cluster_of(cfg, args, own)
    return (run_search if args.search else run_plan)(out, cfg, cluster, args)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input is one ``mptk-plan: error:`` line and exit 2."""
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
