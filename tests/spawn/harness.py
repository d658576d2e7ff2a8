"""Run a function on N real gloo ranks (spawned processes) and collect each rank's result."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
from pathlib import Path

from mptk.parallel.env import DistEnv
from mptk.launch.local import free_port


def tiny_overrides(cache: str) -> list[str]:
    """A GPT small enough for several spawned runs per test on 2 CPU cores."""
    return ["train=smoke", "log=disabled", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.seq_length=32", "model.vocab_size=512",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_interval=0",
            f"data.cache_dir={cache}", "data.max_chars=300000", "optim.warmup_steps=1"]


def _child(fn, env: DistEnv, args: tuple, out: Path) -> None:
    import os

    from mptk.parallel import groups

    try:
        result = fn(env, *args)
        (out / f"rank{env.rank}.pkl").write_bytes(pickle.dumps(result))
    except BaseException:
        (out / f"rank{env.rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    groups.finish(0)


def run_world(fn, world: int, *args, tmp: Path, timeout: float = 600) -> list:
    """``fn(env, *args)`` on ranks 0..world-1; returns the results in rank order."""
    out = Path(tmp) / f"world{world}-{free_port()}"
    out.mkdir(parents=True)
    port, ctx = free_port(), mp.get_context("spawn")
    procs = [ctx.Process(target=_child, args=(fn, DistEnv(
        rank=r, local_rank=r, world_size=world, master_addr="127.0.0.1", master_port=port,
        launcher="spawn"), args, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    errors = [f.read_text() for f in sorted(out.glob("*.err"))]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]


def assert_same(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    """Two runs' per-step losses and grad norms and their held-out figures agree (``eval_top1``,
    a count ratio, exactly)."""
    import numpy as np

    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["eval"]["eval_loss"], ref["eval"]["eval_loss"], rtol=rtol)
    assert got["eval"]["eval_top1"] == ref["eval"]["eval_top1"]
