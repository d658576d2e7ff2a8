"""Mixture-of-Experts through ``mptk-train`` as a user compares runs: ``model=gpt_moe_tiny``
with its experts split over ep=2 ranks (dp=2, ZeRO-1) gives the losses and grad norms of the
one-process ep=1 run (clipping active), and every log step's row carries the aux loss and the
per-expert token load. (Held-out losses depend on dp, which reads dp shares of the held-out
batches: tests/spawn/test_moe.py compares them at equal dp.)"""

import numpy as np
import pytest
from e2e_util import metrics, mptk, tiny

pytestmark = pytest.mark.e2e

STEPS = 3
COMMON = ("model=gpt_moe_tiny", "train=smoke", f"train.steps={STEPS}", "train.eval_interval=0",
          "train.eval_batches=2", "train.save_interval=-1", "parallel.tp=1", "zero=zero1",
          "model.moe_ffn_hidden_size=64", "optim.grad_clip=0.5")


def train(tmp_path, cache, name, *overrides):
    out = mptk(*tiny(cache), *COMMON, f"hydra.run.dir={tmp_path / name}", *overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    return {r["step"]: r for r in metrics(tmp_path / name) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("moe-cli")
    return {"ep1": train(tmp, cache, "ep1", "launcher.nproc_per_node=1"),
            "ep2": train(tmp, cache, "ep2", "launcher.nproc_per_node=2", "parallel.ep=2")}


def test_ep2_equals_ep1_through_the_cli(runs):
    ref, got = runs["ep1"], runs["ep2"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([got[s][key] for s in got], [ref[s][key] for s in got],
                                   rtol=1e-5, atol=0)
    assert ref[1]["loss"] != ref[STEPS]["loss"]


def test_log_rows_carry_aux_loss_and_expert_load(runs):
    for run in runs.values():
        for row in run.values():
            assert row["moe_aux_loss"] > 0
            assert 0 <= row["moe_load_min"] <= 1 <= row["moe_load_max"] <= 8
    np.testing.assert_allclose([r["moe_aux_loss"] for r in runs["ep2"].values()],
                               [r["moe_aux_loss"] for r in runs["ep1"].values()], rtol=1e-5)
    assert [r["moe_load_max"] for r in runs["ep2"].values()] == \
        [r["moe_load_max"] for r in runs["ep1"].values()]
