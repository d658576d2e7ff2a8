"""Run a function on N real gloo ranks (spawned processes) and collect each rank's result."""

from __future__ import annotations

from pathlib import Path

from mptk.launch import runner


def tiny_overrides(cache: str) -> list[str]:
    """A GPT small enough for several spawned runs per test on 2 CPU cores."""
    return ["train=smoke", "log=disabled", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.seq_length=32", "model.vocab_size=512",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_interval=0",
            f"data.cache_dir={cache}", "data.max_chars=300000", "optim.warmup_steps=1"]


def run_world(fn, world: int, *args, tmp: Path, timeout: float = 600) -> list:
    """``fn(env, *args)`` on ranks 0..world-1; returns the results in rank order (a failing
    rank fails the test with every rank's traceback)."""
    try:
        return runner.run(fn, world, *args, timeout=timeout, tmp=Path(tmp))
    except runner.RankError as err:
        raise AssertionError(err.details()) from None


def assert_same(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    """Two runs' per-step losses and grad norms and their held-out figures agree (``eval_top1``,
    a count ratio, exactly)."""
    import numpy as np

    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["eval"]["eval_loss"], ref["eval"]["eval_loss"], rtol=rtol)
    assert got["eval"]["eval_top1"] == ref["eval"]["eval_top1"]


def train_steps(worker, steps: int) -> dict:
    """Per-step loss and grad norm of ``steps`` steps of a set-up worker (``mptk.train.loop``)."""
    from mptk.train.loop import one_step

    out: dict = {"loss": [], "grad_norm": []}
    for step in range(steps):
        loss, norm = one_step(worker, step)
        out["loss"].append(loss)
        out["grad_norm"].append(norm)
    return out


def assert_steps_same(ref: dict, got: dict, rtol: float = 1e-5,
                      norm_rtol: float | None = None) -> None:
    """Two runs' per-step losses (and grad norms, within ``norm_rtol`` when given) agree."""
    import numpy as np

    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=norm_rtol or rtol, atol=0)
