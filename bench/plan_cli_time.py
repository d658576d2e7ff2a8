"""Wall seconds per ``mptk-plan`` call as a user runs it (start-up included): the budget is 2 s.

    python bench/plan_cli_time.py [--repeat 3]

Times a 175B verdict on 1024 H100s (128 nodes x 8) and a 1.3B layout search on 16, each run
twice: as shipped (the planning path imports neither torch nor megatron-core), and with
torch and megatron-core imported first (what every call paid while the recipes imported them
at module level). Prints the best of ``--repeat`` for each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "175B verdict, 1024 GPUs": [
        "model=gpt_1p3b", "model.num_layers=96", "model.hidden_size=12288",
        "model.num_attention_heads=96", "model.vocab_size=51200", "train.dtype=bf16",
        "train.global_batch_size=1536", "parallel.tp=8", "parallel.pp=8", "train.micro_batch_size=1",
        "--nodes", "128", "--gpus-per-node", "8", "--gpu", "h100"],
    "1.3B search, 16 GPUs": [
        "model=gpt_1p3b", "train.dtype=bf16", "--nodes", "2", "--gpus-per-node", "8",
        "--gpu", "h100", "--search"],
}
AS_SHIPPED = "import sys; from mptk.cli.plan import main; sys.argv[0] = 'mptk-plan'; main()"
HEAVY_FIRST = "import torch, megatron.core; " + AS_SHIPPED


def per_call(code: str, args: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if done.returncode not in (0, 1):  # 1 = does not fit, still a verdict
            raise SystemExit(f"mptk-plan {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for name, argv in CASES.items():
        shipped = per_call(AS_SHIPPED, argv, args.repeat)
        heavy = per_call(HEAVY_FIRST, argv, args.repeat)
        print(f"mptk-plan {name}: {shipped:.2f} s per call (with torch + megatron-core imported: "
              f"{heavy:.2f} s; budget 2 s)")


if __name__ == "__main__":
    main()
