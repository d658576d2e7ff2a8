"""The same seed builds the same model at every layout, through ``mptk-train`` and with no
weight copying: tp=2 x pp=2 with the interleaved schedule (vpp=2) over uneven virtual stages
[2,1,1,2] gives the one-process losses and grad norms from step 1 (fp32, 3 steps, seed 7,
global batch 8, micro-batch 2). pp=4 and tp=4 alone are covered by weight equality in
tests/spawn/test_layout_init.py."""

import numpy as np
from e2e_util import metrics, mptk, tiny

MODEL = ("model.num_layers=6", "train=smoke", "train.steps=3", "train.seed=7",
         "train.dtype=fp32", "zero=zero0", "train.eval_interval=0")


def run(tmp_path, cache, name, *overrides):
    out = mptk(*tiny(cache), *MODEL, f"hydra.run.dir={tmp_path / name}", *overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [r for r in metrics(tmp_path / name) if "loss" in r]
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


def test_tp2_pp2_vpp2_uneven_equals_one_process_from_step_1(tmp_path, cache):
    ref = run(tmp_path, cache, "single", "parallel.tp=1", "launcher.nproc_per_node=1")
    got = run(tmp_path, cache, "tp2-pp2-vpp2", "parallel.tp=2", "parallel.pp=2",
              "parallel.vpp=2", "parallel.layers_per_stage=[2,1,1,2]",
              "launcher.nproc_per_node=4")
    assert len(ref[0]) == 3
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=0)
