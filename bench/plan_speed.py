"""mptk-plan search speed on 4096 GPUs (512 nodes x 8 H100): the budget is 2 s.

    python bench/plan_speed.py [--repeat 3]

Times ``mptk.plan.search.search`` alone (the config is composed first, not timed: composing
imports the recipes, i.e. torch and megatron-core, as ``mptk-train`` does). Prints wall and
CPU seconds per search (CPU seconds are what a busy machine disturbs least), the layouts
evaluated and the fastest one.
"""

from __future__ import annotations

import argparse
import time

from mptk.config.load import compose
from mptk.plan import search as s
from mptk.plan.hardware import Cluster, gpu

CASES = {
    "GPT-3 175B, batch 1536, all knobs": (
        ["model=gpt_1p3b", "model.num_layers=96", "model.hidden_size=12288",
         "model.num_attention_heads=96", "model.vocab_size=51200", "train.dtype=bf16",
         "train.global_batch_size=1536"], s.Knobs(recompute=True, sp=True)),
    "GPT 1.3B, batch 2048": (
        ["model=gpt_1p3b", "train.dtype=bf16", "train.global_batch_size=2048"], None),
}


def once(cfg, cluster: Cluster, knobs) -> tuple[float, float, s.Result]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = s.search(cfg, cluster, knobs)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cluster = Cluster(nodes=512, gpus_per_node=8, gpu=gpu("h100"))
    for name, (overrides, knobs) in CASES.items():
        cfg = compose(overrides)
        runs = [once(cfg, cluster, knobs) for _ in range(args.repeat)]
        wall, cpu, result = min(runs, key=lambda r: r[0])
        best = result.ranked[0]
        print(f"{name}: {result.evaluated:,} layouts evaluated, {len(result.ranked):,} fit, "
              f"{sum(result.rejected.values()):,} dropped; best of {args.repeat}: {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU (budget 2 s)")
        print(f"  fastest: {' '.join(s.overrides(cfg, best.choice, cluster))}: "
              f"{best.timing.tokens_per_s:,.0f} tokens/s, MFU {best.timing.mfu:.1%}")


if __name__ == "__main__":
    main()
