"""Context parallelism through ``mptk-train`` as a user compares runs: cp=2 gives the losses,
grad norms and held-out loss of the cp=1 run; a cp=2 run stopped after step 2 resumes from
its checkpoint exactly (every row as the uninterrupted cp=2 run); and the cp=2 checkpoint
loads with ``train.init_from`` at cp=1 with the same held-out loss."""

import numpy as np
import pytest
from e2e_util import assert_rows_close, metrics, mptk, tiny

pytestmark = pytest.mark.e2e

STEPS = 4
COMMON = ("train=smoke", f"train.steps={STEPS}", "train.eval_interval=0", "train.eval_batches=2",
          "parallel.tp=1", "zero=zero1", "model.position_embedding=rope")
CP2 = ("parallel.cp=2", "launcher.nproc_per_node=2", "train.save_interval=2")


def train(tmp_path, cache, name, *overrides, env=None, code=0):
    out = mptk(*tiny(cache), *COMMON, f"hydra.run.dir={tmp_path / name}", *overrides, env=env)
    assert out.returncode == code, out.stdout + out.stderr
    return out


def rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("cp-cli")
    train(tmp, cache, "cp1", "launcher.nproc_per_node=1")
    train(tmp, cache, "cp2", *CP2)
    train(tmp, cache, "cut", *CP2, env={"MPTK_TEST_SIGTERM_AFTER_STEP": "2"}, code=3)
    # The launcher forwards the SIGTERM asynchronously: the run stops after step 2 or 3.
    stopped = max(rows(tmp / "cut"))
    assert 2 <= stopped < STEPS
    resumed = train(tmp, cache, "cut", *CP2)
    assert f"at step {stopped}" in resumed.stdout
    ckpt = tmp / "cp2" / "checkpoints" / f"step_{STEPS:08d}"
    # A learning rate of 1e-12: the one step the run must take leaves the loaded weights as
    # they are, so its held-out loss is the checkpoint's.
    train(tmp, cache, "init", "launcher.nproc_per_node=1", "train.steps=1", "optim.lr=1e-12",
          "optim.min_lr=0", f"train.init_from={ckpt}")
    return {name: rows(tmp / name) for name in ("cp1", "cp2", "cut", "init")}


def test_cp2_equals_cp1_through_the_cli(runs):
    ref, got = runs["cp1"], runs["cp2"]
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_rows_close(ref, got)
    np.testing.assert_allclose(got[STEPS]["eval_loss"], ref[STEPS]["eval_loss"], rtol=1e-5)


def test_cp2_resumes_exactly_at_cp2(runs):
    keys = ("loss", "lr", "grad_norm", "eval_loss")
    cut = {s: {k: r.get(k) for k in keys} for s, r in runs["cut"].items()}
    whole = {s: {k: r.get(k) for k in keys} for s, r in runs["cp2"].items()}
    assert cut == whole


def test_cp2_checkpoint_loads_at_cp1_with_the_same_heldout_loss(runs):
    np.testing.assert_allclose(runs["init"][1]["eval_loss"], runs["cp2"][STEPS]["eval_loss"],
                               rtol=1e-6)
