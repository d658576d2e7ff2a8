"""A run resumes with its optimizer state at another layout, through ``mptk-train``: 6 steps
straight at tp2 x dp2 (ZeRO-1) equal 3 steps there, then 3 more at tp1 x dp4 (ZeRO-2), or at
pp2 x dp2 (ZeRO-1), within 1e-5 relative on loss and grad norm at steps 4-6 (fp32, seed 7,
global batch 8, micro-batch 2, AdamW).

The straight run saves after steps 3 and 6. Each resume runs in a copy of its run dir with the
step-6 checkpoint removed: the run dir as it was after step 3 (the metrics rows of steps 4-6
are trimmed by the resume itself). The two resumes run at the same time (8 processes on the
CPU) to keep the wall time near two runs."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from e2e_util import metrics, mptk, tiny

MODEL = ("train=smoke", "train.steps=6", "train.seed=7", "train.dtype=fp32",
         "train.eval_interval=0", "launcher.nproc_per_node=4")
TARGETS = {"tp1-dp4-zero2": ("parallel.tp=1", "zero=zero2"),
           "pp2-dp2-zero1": ("parallel.tp=1", "parallel.pp=2", "zero=zero1")}
LINES = {"tp1-dp4-zero2": "mptk: resuming at another layout: tp 2->1, dp 2->4, zero 1->2",
         "pp2-dp2-zero1": "mptk: resuming at another layout: tp 2->1, pp 1->2"}


def train(run_dir, cache, *overrides):
    out = mptk(*tiny(cache), *MODEL, f"hydra.run.dir={run_dir}", *overrides)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """The straight run's rows, and per target layout its rows and stdout."""
    root = tmp_path_factory.mktemp("relayout")
    train(root / "straight", cache, "parallel.tp=2", "zero=zero1", "train.save_interval=3")
    for name in TARGETS:
        shutil.copytree(root / "straight", root / name)
        shutil.rmtree(root / name / "checkpoints" / "step_00000006")
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        outs = dict(zip(TARGETS, pool.map(
            lambda n: train(root / n, cache, *TARGETS[n], "train.save_interval=-1"), TARGETS)))
    return {"straight": metrics(root / "straight"),
            **{n: (metrics(root / n), outs[n].stdout) for n in TARGETS}}


def steps(rows, key):
    return [r[key] for r in rows if "loss" in r]


@pytest.mark.parametrize("target", list(TARGETS))
def test_resume_at_another_layout_continues_the_straight_run(runs, target):
    ref, (got, stdout) = runs["straight"], runs[target]
    assert steps(got, "step") == [1, 2, 3, 4, 5, 6]
    assert got[:3] == ref[:3]  # the rows of steps 1-3 are the saved run's own
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(steps(got, key)[3:], steps(ref, key)[3:], rtol=1e-5, atol=0)
    np.testing.assert_allclose(steps(got, "lr"), steps(ref, "lr"), rtol=1e-12)
    said = [line for line in stdout.splitlines() if "resuming at another layout" in line]
    assert said == [LINES[target]], stdout
    assert "resumed from" in stdout and "at step 3 (24 samples consumed)" in stdout
