"""``mptk-bench``: GPT training speed through mptk's own path, beside a plain-PyTorch GPT of the
same shape measured in the same run.

    mptk-bench --shape tiny                                  # CPU, seconds (tests use this)
    mptk-bench --shape 1p3b --steps 20 --warmup 5            # one GPU: model=gpt_1p3b, bf16
    mptk-bench --shape 1p3b --variants torch_compile,zero1_compile optim.lr=3e-4

Output: one JSON line per variant on stdout (progress and worker logs on stderr); what is
measured and how: :mod:`mptk.launch.bench`. A failing variant prints a line with ``error`` and
the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mptk.launch.bench import DEFAULT_VARIANTS, SHAPES, VARIANTS


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (an unknown variant or a step count below 1 is refused)."""
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


def main(argv: list[str] | None = None) -> int:
    """Parse, run the variants, print a JSON line per variant and the summary; exit code."""
    import torch

    from mptk.config.load import ConfigError
    from mptk.launch import bench
    from mptk.log.noise import quiet

    quiet()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nproc = args.nproc or max(1, torch.cuda.device_count())
    variants = bench.ordered(args.variants.split(","))
    try:
        if variants[-1] not in bench.BASELINES:  # mptk variants read the recipe's data
            bench.prepare_data(bench.compose_variant(args, variants[-1], nproc))
    except ConfigError as err:
        bench.say(f"error: {err}")
        return 2

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")
        bench.say(bench.summary_line(record))

    done = bench.run_variants(args, variants, nproc, emit)
    bench.say("summary (TFLOP/s are model FLOPs per device, Megatron's formula):")
    for record in done.values():
        bench.say("  " + bench.summary_line(record))
    return 1 if any("error" in r for r in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
