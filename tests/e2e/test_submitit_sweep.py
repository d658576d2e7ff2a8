"""A Hydra sweep through hydra-submitit-launcher on the CI's real Slurm (``bash .ci/slurm_up.sh``):
``mptk-train -m hydra/launcher=submitit_slurm ...`` submits one Slurm job per sweep point; each
job's one task runs mptk's rank runner (here 2 gloo ranks) and the sweep waits for both.

Skips with the reason when no Slurm answers. Without accounting submitit cannot read a job's
state (it warns about sacct) and learns the end of a job from its result file only.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from e2e_util import BIN, metrics, tiny
from test_slurm import job_env, read, slurm_unavailable, start_requeued_now

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

SWEEP_TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def need_slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def sweep_cmd(sweep_dir: Path, cache: str, *overrides: str, steps: int = 3) -> list[str]:
    """``mptk-train -m hydra/launcher=submitit_slurm`` on 2 ranks per job, a tiny GPT."""
    return [str(BIN / "mptk-train"), "-m", "hydra/launcher=submitit_slurm", *tiny(cache),
            f"train.steps={steps}", "parallel=single", "launcher.nproc_per_node=2",
            f"hydra.sweep.dir={sweep_dir}", *overrides]


def sweep(sweep_dir: Path, cache: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(sweep_dir, cache, *overrides), capture_output=True, text=True,
                          cwd=sweep_dir.parent, env=job_env(), timeout=SWEEP_TIMEOUT_S)


def job_logs(sweep_dir: Path) -> dict[str, str]:
    """Slurm job id (``<job>_<index>`` in an array, of several points) -> its submitit stdout +
    stderr."""
    folders = [d for d in sorted((sweep_dir / ".submitit").glob("[0-9]*")) if any(d.glob("*_log.*"))]
    return {d.name: "".join(f.read_text() for f in sorted(d.glob("*_log.*"))) for d in folders}


C10D_INFO = re.compile(r"\[I\d{4} [^\]]*\] \[c10d\]")
"""A c10d log line at INFO (torch prints those only with TORCH_CPP_LOG_LEVEL=INFO)."""


def test_two_point_lr_sweep_runs_as_two_slurm_jobs(tmp_path, cache):
    """Both points run; each job's ranks get cluster.env (here a variable that turns on c10d's INFO
    lines in their output), as the tasks of an sbatch job do."""
    sweep_dir = tmp_path / "sweep"
    out = sweep(sweep_dir, cache, "optim.lr=1e-3,2e-3", "+cluster.env.TORCH_CPP_LOG_LEVEL=INFO")
    assert out.returncode == 0, out.stdout + out.stderr
    logs = job_logs(sweep_dir)
    assert len(logs) == 2, (sorted(logs), out.stderr)
    for log in logs.values():
        assert "submitit INFO" in log and "Job completed successfully" in log, log
        assert re.search(r"layout tp=1 pp=1 dp=2 grad_acc=\d+ world=2 on cpu \(gloo\) launcher=spawn", log), log
        assert C10D_INFO.search(log), log
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


def only_job(sweep_dir: Path, proc: subprocess.Popen, deadline: float) -> str:
    """The Slurm job id of a one-point sweep, once submitit has made its folder."""
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(d.name for d in (sweep_dir / ".submitit").glob("[0-9]*") if d.is_dir())
        if found:
            return found[0]
        time.sleep(0.5)
    pytest.fail(f"no submitit job folder under {sweep_dir} (sweep exit {proc.poll()})")


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, deadline: float) -> None:
    while text not in read(path):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"no {text!r} in {path} (sweep exit {proc.poll()}): {read(path)}")
        time.sleep(0.3)


def test_submitit_signal_saves_requeues_and_resumes(tmp_path, cache):
    """submitit's pre-timeout SIGUSR2 (sent here with scancel to every process of the job, as its
    --signal=USR2@signal_delay_s does) -> the ranks save and stop -> submitit requeues the job ->
    it runs the sweep point again, resumes from that checkpoint and finishes; the sweep succeeds."""
    steps = 200
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(sweep_cmd(sweep_dir, cache, "optim.lr=1e-3", steps=steps), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=job_env())
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    job = ""
    try:
        job = only_job(sweep_dir, proc, deadline)
        wait_for_line(sweep_dir / ".submitit" / job / f"{job}_0_log.out", f"step 2/{steps} |", proc, deadline)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        start_requeued_now(job)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            if job:
                subprocess.run(["scancel", job], capture_output=True)
    log = job_logs(sweep_dir)[job]
    assert proc.returncode == 0, out + err + log
    assert "Caught signal SIGUSR2" in log and f"Requeued job {job}" in log, log
    assert "stopped by a signal; checkpoint saved; exit 3 (requeue)" in log, log
    assert "checkpoint saved on submitit's SIGUSR2; submitit requeues this job" in log, log
    assert re.search(r"resumed from \S+ at step \d+", log), log
    assert len(re.findall(r"^submitit INFO .* - Job completed successfully$", log, re.MULTILINE)) == 1, log
    assert [r["step"] for r in metrics(sweep_dir / "0")] == list(range(1, steps + 1))
    assert not C10D_INFO.search(log)  # the other test's cluster.env variable is not set here
