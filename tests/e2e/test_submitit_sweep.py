"""A Hydra sweep through hydra-submitit-launcher on the CI's real Slurm (``bash .ci/slurm_up.sh``):
``mptk-train -m hydra/launcher=submitit_slurm ...`` submits one Slurm job per sweep point; each
job's one task runs mptk's rank runner (here 2 gloo ranks) and the sweep waits for both.

Skips with the reason when no Slurm answers. Without accounting submitit cannot read a job's
state (it warns about sacct) and learns the end of a job from its result file only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from e2e_util import BIN, metrics, tiny
from test_slurm import job_env, slurm_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

SWEEP_TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def need_slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def sweep(sweep_dir: Path, cache: str, *overrides: str) -> subprocess.CompletedProcess:
    """``mptk-train -m hydra/launcher=submitit_slurm`` on 2 ranks per job, a tiny GPT, 3 steps."""
    args = ["-m", "hydra/launcher=submitit_slurm", *tiny(cache), "train.steps=3", "parallel=single",
            "launcher.nproc_per_node=2", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return subprocess.run([str(BIN / "mptk-train"), *args], capture_output=True, text=True,
                          cwd=sweep_dir.parent, env=job_env(), timeout=SWEEP_TIMEOUT_S)


def job_logs(sweep_dir: Path) -> dict[str, str]:
    """Slurm array task id (``<job>_<index>``) -> its submitit stdout + stderr."""
    return {d.name: "".join(f.read_text() for f in sorted(d.glob("*_log.*")))
            for d in sorted((sweep_dir / ".submitit").glob("*_*")) if d.is_dir()}


def test_two_point_lr_sweep_runs_as_two_slurm_jobs(tmp_path, cache):
    sweep_dir = tmp_path / "sweep"
    out = sweep(sweep_dir, cache, "optim.lr=1e-3,2e-3")
    assert out.returncode == 0, out.stdout + out.stderr
    logs = job_logs(sweep_dir)
    assert len(logs) == 2, (sorted(logs), out.stderr)
    for log in logs.values():
        assert "submitit INFO" in log and "Job completed successfully" in log, log
        assert re.search(r"layout tp=1 pp=1 dp=2 grad_acc=\d+ world=2 on cpu \(gloo\) launcher=spawn", log), log
    for num, lr in (("0", 1e-3), ("1", 2e-3)):
        rows = metrics(sweep_dir / num)
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[0]["lr"] == pytest.approx(lr)  # warm-up of 1 step: step 1 runs at the peak
    first = [metrics(sweep_dir / n)[-1]["loss"] for n in "01"]
    assert first[0] != first[1]  # two different runs, not one run twice


def test_bad_sweep_point_stops_the_sweep_with_its_line(tmp_path, cache):
    """A refused config inside a job comes back to the sweep as its one-line reason (not a wait
    for a result that never comes)."""
    out = sweep(tmp_path / "sweep", cache, "train.global_batch_size=7")
    assert out.returncode == 1
    assert ("mptk: error: train.global_batch_size(7) != micro_batch_size(2) * grad_acc * dp(2)"
            in out.stderr), out.stderr
    assert not list((tmp_path / "sweep").glob("*/metrics.jsonl"))
