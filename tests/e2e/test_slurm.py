"""mptk under a real Slurm: the shipped slurm/gpt.sbatch and mptk-submit, sbatch'ed as a user does.

Needs a running Slurm with an idle node of at least 4 CPUs (``bash .ci/slurm_up.sh`` brings up a
one-node Slurm on this machine); every test skips with the reason when there is none. Without
accounting there is no sacct: jobs are followed with ``scontrol show job`` and their output file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_util import BIN, metrics, tiny

REPO = Path(__file__).resolve().parents[2]
GPT_SBATCH = REPO / "slurm" / "gpt.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
JOB_TIMEOUT_S = 600


def slurm_unavailable() -> str | None:
    """Why Slurm cannot run the tests here, or None."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "Slurm is not installed (no sinfo/sbatch): run `bash .ci/slurm_up.sh`"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering (run `bash .ci/slurm_up.sh`)"
    if out.returncode:
        return f"sinfo failed: {out.stderr.strip()} (run `bash .ci/slurm_up.sh`)"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(state.rstrip("*~#").startswith(("idle", "mix")) and int(cpus) >= 4 for state, cpus in nodes):
        return f"no idle Slurm node with >= 4 CPUs (sinfo: {out.stdout.strip()!r})"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.slurm]


@pytest.fixture(scope="module", autouse=True)
def need_slurm():
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job -o``'s KEY=VALUE fields ({} once the job is forgotten)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def sbatch(*args: str, cwd: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd,
                         env=job_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_env() -> dict[str, str]:
    """The submitter's environment (sbatch exports it) with this venv's python for the tasks."""
    return {**os.environ, "MPTK_PYTHON": sys.executable, "PATH": f"{BIN}:{os.environ['PATH']}"}


def wait(job: str, until=lambda info: info.get("JobState") in TERMINAL) -> dict[str, str]:
    """Poll until ``until(info)``; cancel the job and fail after JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(2)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} did not finish in {JOB_TIMEOUT_S}s: {job_info(job)}")


def start_requeued_now(job: str) -> None:
    """A requeued job waits ~2 min (Slurm's requeue begin delay) unless made eligible now, once
    it is pending again: an update made while it still completes is undone by the requeue."""
    wait(job, until=lambda info: (info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING"))
         or info.get("JobState") in TERMINAL)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<no output file {path}>"


def tiny_gpt(cache: str, steps: int) -> list[str]:
    """4 tasks: tp=2 x dp=2 on gloo, a tiny GPT, a few steps."""
    return [*tiny(cache), "train=smoke", f"train.steps={steps}", "train.eval_interval=0",
            "parallel.tp=2", "launcher.backend=gloo"]


def test_shipped_gpt_sbatch_trains_under_slurm(tmp_path, cache):
    job = sbatch(f"--output={tmp_path}/job-%j.out", str(GPT_SBATCH), *tiny_gpt(cache, 3), cwd=tmp_path)
    info = wait(job)
    output = read(tmp_path / f"job-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output
    assert re.search(r"layout tp=2 pp=1 dp=2 grad_acc=\d+ world=4 on cpu \(gloo\) launcher=slurm", output), output
    assert re.search(r"^step 3/3 \| loss \d", output, re.MULTILINE), output
    assert "4 tasks on 1 node(s)" in output
    run_dir = tmp_path / "outputs" / "slurm" / f"mptk-gpt-{job}"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_mptk_submit_renders_and_submits(tmp_path, cache):
    run_dir = tmp_path / "run"
    out = subprocess.run([str(BIN / "mptk-submit"), *tiny_gpt(cache, 2), f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, cwd=tmp_path, env=job_env(), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"sbatch {run_dir / 'job.sbatch'}" in out.stdout
    job = re.search(r"submitted job (\d+)", out.stdout).group(1)
    info = wait(job)
    output = read(run_dir / f"slurm-{job}.out")
    assert info["JobState"] == "COMPLETED", output
    assert "world=4 on cpu (gloo) launcher=slurm" in output and "step 2/2 | loss" in output, output
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_allocation_that_differs_from_the_profile_fails_in_one_line(tmp_path, cache):
    job = sbatch(f"--output={tmp_path}/job-%j.out", str(GPT_SBATCH), *tiny_gpt(cache, 2),
                 "cluster.nodes=2", cwd=tmp_path)
    info = wait(job)
    output = read(tmp_path / f"job-{job}.out")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", output
    assert ("mptk: error: cluster: world(4) != cluster.nodes(2) * cluster.tasks_per_node(4)=8 "
            "under Slurm") in output
    assert "step 1/" not in output and "Traceback" not in output


def two_namespace_nodes() -> str | None:
    """Why partition "two" (``SLURM_NODES=2 bash .ci/slurm_up.sh``) cannot run a job, or None."""
    out = subprocess.run(["sinfo", "-h", "-p", "two", "-N", "-o", "%N %t"], capture_output=True, text=True)
    idle = [line for line in out.stdout.splitlines() if line.split()[-1].startswith(("idle", "mix"))]
    if len(idle) < 2:
        return "no partition 'two' with 2 idle nodes: bring them up with SLURM_NODES=2 bash .ci/slurm_up.sh"
    return None


def test_two_nodes_in_network_namespaces(tmp_path, cache):
    """2 nodes x 2 tasks (each node its own network stack, hostname on loopback): rendezvous and
    gloo cross nodes without GLOO_SOCKET_IFNAME (each task picks its interface)."""
    reason = two_namespace_nodes()
    if reason:
        pytest.skip(reason)
    job = sbatch("--partition=two", "--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out",
                 str(GPT_SBATCH), *tiny_gpt(cache, 3), "cluster.nodes=2", "cluster.tasks_per_node=2",
                 cwd=tmp_path)
    info = wait(job)
    output = read(tmp_path / f"job-{job}.out")
    assert info["JobState"] == "COMPLETED", output
    assert "4 tasks on 2 node(s) [mptk-n[1-2]], master mptk-n1:" in output, output
    # no GLOO_SOCKET_IFNAME given: each node picked the NIC of its route to the master
    for ip in ("10.77.0.1", "10.77.0.2"):
        assert f"eth0 ({ip}) carries the route to MASTER_ADDR=mptk-n1 (10.77.0.1)" in output, output
    assert "world=4 on cpu (gloo) launcher=slurm" in output and "step 3/3 | loss" in output, output


def test_sigusr1_saves_requeues_and_resumes(tmp_path, cache):
    """Slurm's pre-timeout SIGUSR1 (sent here with scancel) -> save, exit 3 -> scontrol requeue ->
    the second run resumes in the same run dir and finishes every step."""
    steps = 40
    job = sbatch(f"--output={tmp_path}/job-%j.out", str(GPT_SBATCH), *tiny_gpt(cache, steps), cwd=tmp_path)
    out_file = tmp_path / f"job-{job}.out"
    wait(job, until=lambda info: "step 2/" in read(out_file) or info.get("JobState") in TERMINAL)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    start_requeued_now(job)
    info = wait(job)
    output = read(out_file)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", output
    assert "asked to be requeued (exit 3); requeue 1/1" in output, output
    assert "restart 1/1" in output
    rows = metrics(tmp_path / "outputs" / "slurm" / f"mptk-gpt-{job}")
    assert rows[-1]["step"] == steps
