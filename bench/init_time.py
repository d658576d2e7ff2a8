"""Model set-up time, megatron's own initialisation vs mptk's layout-invariant one.

``model=gpt_1p3b`` (24 layers x 2048, vocabulary 50304, ~1.3B parameters) at pp=4 on 4 local
gloo ranks (``mptk.launch.runner``), fp32 on the CPU. Each rank builds its stage twice (the
order alternates over ``--repeats``): once as before (``recipe.build`` with megatron drawing
each stage's weights itself on the CPU: full matrices, then the tp split) and once as the
trainer builds it now (:func:`mptk.train.loop.build_model`: megatron's init methods draw
nothing, :func:`mptk.models.init.initialise` draws every weight from the seed and its global
identity). Prints the slowest rank's seconds of each path and their ratio.

    .venv/bin/python bench/init_time.py [--model gpt_1p3b] [--pp 4] [--repeats 1]

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path


def overrides(a: argparse.Namespace) -> list[str]:
    return [f"model={a.model}", "train=smoke", "log=disabled", "zero=zero0", "parallel.tp=1",
            f"parallel.pp={a.pp}", f"launcher.nproc_per_node={a.pp}", "train.dtype=fp32",
            "train.micro_batch_size=1", f"train.global_batch_size={a.pp}"]


def megatron_build(recipe, cfg, layout):
    """The previous path: megatron initialises the stage from the seed itself."""
    import torch

    from mptk.compat.cpu import device_scope
    from mptk.train.loop import model_context

    with device_scope():
        return recipe.build(cfg.model, model_context(cfg, layout, None, "gloo")).to(torch.device("cpu"))


def measure(env, cfg, repeats: int) -> dict:
    """Seconds of each path on this rank (every rank builds in step with the others)."""
    import torch
    import torch.distributed as dist

    from mptk.config import registry
    from mptk.parallel import groups
    from mptk.train.loop import build_model
    from mptk.train.preflight import preflight

    layout = preflight(cfg, env.world_size, False)
    groups.init(env, layout.tp, layout.pp, torch.device("cpu"), "gloo", cfg.train.seed)
    recipe = registry.get(cfg.model.recipe)
    paths = {"megatron": lambda: megatron_build(recipe, cfg, layout),
             "mptk": lambda: build_model(recipe, cfg, layout, torch.device("cpu"), "gloo")}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(repeats):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            dist.barrier()
            start = time.perf_counter()
            model = paths[name]()
            times[name].append(time.perf_counter() - start)
            params = sum(p.numel() for p in model.parameters())
            del model
            gc.collect()
    return {"params": params, **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_1p3b")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    a = parser.parse_args()

    from mptk.config.load import compose
    from mptk.launch import runner

    cfg = compose(overrides(a))
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_dir = tmp
        ranks = runner.run(measure, a.pp, cfg, a.repeats, timeout=3600, tmp=Path(tmp))
    old = max(r["megatron"] for r in ranks)
    new = max(r["mptk"] for r in ranks)
    for rank, r in enumerate(ranks):
        print(f"rank {rank}: {r['params']:,} parameters  megatron init {r['megatron']:.2f} s  "
              f"layout-invariant init {r['mptk']:.2f} s")
    print(f"slowest rank: megatron {old:.2f} s, layout-invariant {new:.2f} s, ratio {new / old:.2f}")
    print(json.dumps({"model": a.model, "pp": a.pp, "megatron_s": old, "mptk_s": new,
                      "ratio": new / old}))


if __name__ == "__main__":
    main()
