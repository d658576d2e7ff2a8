"""Context parallelism, measured: per-rank activation bytes saved for backward and step time
of ``experiment=long_context`` (gpt_tiny at seq 8192, rotary positions, fp32, ZeRO-1,
micro-batch 1) at cp=1 (one process) and cp=4 (four local gloo ranks, ``mptk.launch.runner``).

Per rank it counts the unique storages autograd saves during one step's forward
(``saved_tensors_hooks``, parameters excluded: the approach of ``bench/memory_levers.py``),
times a few more steps (median) and prints both beside the planner's activation estimate
(``mptk.plan.memory.rank_memory``). Target: cp=4 at most 0.3x the bytes of cp=1.

    .venv/bin/python bench/long_context.py [--seq 8192] [--steps 2] [--cp 4]

Prints a table, then one JSON line per run. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def overrides(a: argparse.Namespace, cp: int) -> list[str]:
    return ["experiment=long_context", "log=disabled", f"launcher.nproc_per_node={cp}",
            f"parallel.cp={cp}", f"model.seq_length={a.seq}", "train.global_batch_size=1",
            "train.micro_batch_size=1", "train.eval_interval=0", "optim.warmup_steps=1"]


def saved_bytes(w) -> tuple[int, int]:
    """Unique non-parameter storages saved for backward by one step's forward: (bytes, count)."""
    import torch

    from mptk.train.loop import one_step

    params = {p.untyped_storage().data_ptr() for p in w.engine.module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if torch._C._current_graph_task_id() != -1:  # inside backward (recomputation)
            return t
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        one_step(w, 0)
    return sum(seen.values()), len(seen)


def measure(env, cfg, steps: int) -> dict:
    """On one rank: saved bytes of step 0, then the median time of ``steps`` more steps."""
    from mptk.train.loop import one_step, setup

    w = setup(cfg, env)
    nbytes, count = saved_bytes(w)
    times = []
    for step in range(1, steps + 1):
        began = time.perf_counter()
        one_step(w, step)
        times.append(time.perf_counter() - began)
    return {"saved_bytes": nbytes, "storages": count, "step_s": statistics.median(times)}


def planner(cfg) -> float:
    """The planner's activations (+ output head) of one rank, one micro-batch."""
    from mptk.plan import RESERVE, choice_of, stage_counts
    from mptk.plan.cost import shape_of
    from mptk.plan.memory import rank_memory, training_of

    c = choice_of(cfg, cfg.launcher.nproc_per_node)
    tr = training_of(cfg)
    m = rank_memory(shape_of(cfg.model), c, tr, stage_counts(cfg, c), 0, RESERVE)
    return m.activations + m.head


def run(a: argparse.Namespace, cp: int) -> dict:
    from mptk.config.load import compose
    from mptk.launch import runner

    cfg = compose(overrides(a, cp))
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_dir = str(Path(tmp) / "run")
        ranks = runner.run(measure, cp, cfg, a.steps, tmp=Path(tmp), stdout_to_stderr=True)
    worst = max(ranks, key=lambda r: r["saved_bytes"])
    return {"cp": cp, "seq": a.seq, **worst, "planner_bytes": planner(cfg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cp", type=int, default=4)
    a = parser.parse_args(argv)
    results = [run(a, 1), run(a, a.cp)]
    base = results[0]["saved_bytes"]
    print(f"{'cp':>3} {'saved MiB/rank':>15} {'ratio':>6} {'planner MiB':>12} {'step s':>7}")
    for r in results:
        print(f"{r['cp']:>3} {r['saved_bytes'] / 2**20:>15.1f} {r['saved_bytes'] / base:>6.3f} "
              f"{r['planner_bytes'] / 2**20:>12.1f} {r['step_s']:>7.2f}")
    for r in results:
        print(json.dumps(r))
    ratio = results[1]["saved_bytes"] / base
    print(f"cp={a.cp} / cp=1 saved bytes per rank: {ratio:.3f} (target <= 0.3)")
    return 0 if ratio <= 0.3 else 1


if __name__ == "__main__":
    sys.exit(main())
