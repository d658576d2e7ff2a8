"""The memory levers through ``mptk-train`` as a user compares runs: tp=2 with sequence
parallelism and full recomputation gives the losses and grad norms of the tp=1 run."""

import numpy as np
from e2e_util import metrics, mptk, tiny


def run(tmp_path, cache, name, *overrides):
    args = (*tiny(cache), "train=smoke", "train.steps=3", "launcher.nproc_per_node=2", "zero=zero1",
            "train.eval_interval=0", f"hydra.run.dir={tmp_path / name}", *overrides)
    out = mptk(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [r for r in metrics(tmp_path / name) if "loss" in r]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


def test_sp_and_recompute_equal_tp1_through_the_cli(tmp_path, cache):
    ref = run(tmp_path, cache, "tp1", "parallel.tp=1")
    got = run(tmp_path, cache, "tp2-sp-full", "parallel.tp=2", "parallel.sp=true",
              "train.recompute=full")
    assert len(ref[0]) == 3
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=0)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=0)
