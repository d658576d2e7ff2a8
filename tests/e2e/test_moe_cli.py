"""Mixture-of-Experts through ``mptk-train`` as a user compares runs: ``model=gpt_moe_tiny``
with its experts split over ep=2 ranks (dp=2, ZeRO-1) gives the losses and grad norms of the
one-process ep=1 run (clipping active), and every log step's row carries the aux loss and the
per-expert token load. (Held-out losses depend on dp, which reads dp shares of the held-out
batches: tests/spawn/test_moe.py compares them at equal dp.) The ep=2 run saves after steps 3
and 6; from its step-3 checkpoint a resume at ep=2 repeats steps 4-6 bit for bit, and one at
ep=1 on one process (ZeRO-2, the experts and their optimizer state resharded) within 1e-5."""

import shutil

import numpy as np
import pytest
from e2e_util import assert_rows_close, metrics, mptk, tiny

pytestmark = pytest.mark.e2e

STEPS = 6
COMMON = ("model=gpt_moe_tiny", "train=smoke", f"train.steps={STEPS}", "train.eval_interval=0",
          "train.eval_batches=2", "parallel.tp=1", "zero=zero1",
          "model.moe_ffn_hidden_size=64", "optim.grad_clip=0.5")
ONE, EP2 = ("launcher.nproc_per_node=1", "train.save_interval=-1"), \
    ("launcher.nproc_per_node=2", "parallel.ep=2", "train.save_interval=3")


def train(tmp_path, cache, name, *overrides):
    out = mptk(*tiny(cache), *COMMON, f"hydra.run.dir={tmp_path / name}", *overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    return {r["step"]: r for r in metrics(tmp_path / name) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("moe-cli")
    runs = {"ep1": train(tmp, cache, "ep1", *ONE), "ep2": train(tmp, cache, "ep2", *EP2)}
    for name, layout in (("ep2-resumed", EP2), ("ep1-resumed", (*ONE, "zero=zero2"))):
        shutil.copytree(tmp / "ep2", tmp / name)  # the run dir as it was after step 3
        shutil.rmtree(tmp / name / "checkpoints" / f"step_{STEPS:08d}")
        runs[name] = train(tmp, cache, name, *layout)
    return runs


def test_ep2_checkpoint_resumes_exactly_at_ep2_and_resharded_at_ep1(runs):
    whole, keys = runs["ep2"], ("loss", "grad_norm", "lr", "moe_aux_loss", "moe_load_max")
    assert {s: [r[k] for k in keys] for s, r in runs["ep2-resumed"].items()} == \
        {s: [r[k] for k in keys] for s, r in whole.items()}
    got = runs["ep1-resumed"]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_rows_close(whole, got, ("loss", "grad_norm", "moe_aux_loss"), range(4, STEPS + 1))


def test_ep2_equals_ep1_through_the_cli(runs):
    ref, got = runs["ep1"], runs["ep2"]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_rows_close(ref, got)
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
