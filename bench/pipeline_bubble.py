"""Pipeline bubble vs micro-batch count: step time and measured bubble beside the formula.

Runs ``mptk-train`` at pp=4 on 4 local CPU processes (a fixed small GPT, 8 layers) for
m = 1, 2, 4, 8 micro-batches per step, prints one row per m, and writes a plot.

    .venv/bin/python bench/pipeline_bubble.py [--out DIR] [--steps N]

The measured bubble is the mean over stages of (time waiting in p2p send/recv) / (schedule
time); the formula is megatron's (p-1)/(m+p-1). On 2 CPU cores shared by 4 processes the
absolute times are noisy; the trend with m is the point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
MODEL = ["model.num_layers=8", "model.hidden_size=128", "model.seq_length=64",
         "model.vocab_size=1024", "data.max_chars=300000", "log=disabled", "parallel.tp=1",
         "parallel.pp=4", "parallel.layers_per_stage=[2,2,2,2]", "launcher.nproc_per_node=4",
         "optim.warmup_steps=1", "train.eval_interval=0", "train.micro_batch_size=2"]


def run(m: int, steps: int, out: Path) -> dict:
    run_dir = out / f"m{m}"
    cmd = [str(BIN / "mptk-train"), *MODEL, f"train.global_batch_size={2 * m}",
           f"train.steps={steps}", "train.log_interval=1", f"hydra.run.dir={run_dir}",
           "train.save_interval=-1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "bubble_measured" in r][1:]  # skip the warm-up step
    return {"m": m, "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "bubble_measured": statistics.median(r["bubble_measured"] for r in rows),
            "bubble_theory": rows[0]["bubble_theory"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [r["m"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ms, [r["bubble_measured"] for r in results], "o-", label="measured (p2p wait)")
    ax.plot(ms, [r["bubble_theory"] for r in results], "s--", label="(p-1)/(m+p-1)")
    ax.set(xscale="log", xticks=ms, xticklabels=ms, xlabel="micro-batches per step (m)",
           ylabel="bubble fraction", title="pp=4, 1F1B, 4 CPU processes")
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_pipeline_bubble"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'m':>3} {'step_time_s':>12} {'bubble_measured':>16} {'bubble_theory':>14}")
    for m in (1, 2, 4, 8):
        r = run(m, args.steps, args.out)
        results.append(r)
        print(f"{m:>3} {r['step_time_s']:>12.3f} {r['bubble_measured']:>16.3f} "
              f"{r['bubble_theory']:>14.3f}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bubble.png")
    print(f"plot: {args.out / 'bubble.png'}")


if __name__ == "__main__":
    main()
