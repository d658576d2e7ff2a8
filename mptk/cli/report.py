"""``mptk-report RUN_DIR``: write ``RUN_DIR/report.png`` from metrics.jsonl and print a summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mptk-report",
        description="Plot loss, held-out loss, throughput and memory of a run from its "
                    "metrics.jsonl into RUN_DIR/report.png, and print a summary.")
    parser.add_argument("run_dir", help="a run dir holding metrics.jsonl")
    parser.add_argument("-o", "--out", help="PNG path (default RUN_DIR/report.png)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from mptk.log import report

    args = parse(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"mptk-report: error: no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    out = report.plot(args.run_dir, args.out)
    print(report.summary(args.run_dir))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
