"""A submitit sweep job's launcher (mptk.launch.sweep_job): the profile's variables it sets, and
submitit's signal, which the ranks save on before submitit's own handler requeues the job. The
handoff runs here with real signals and a real child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mptk.config.checks import submitit_signal
from mptk.config.schema import ClusterConfig
from mptk.exitcodes import REQUEUE_EXIT_CODE
from mptk.launch import sweep_job

JOB = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/x/.submitit/7"}


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SUBMITIT_PREEMPT_SIGNAL": "USR2"}, None),  # not a sweep job: nothing to take over
    (JOB, signal.SIGUSR2),
    ({**JOB, "SUBMITIT_PREEMPT_SIGNAL": "USR1"}, signal.SIGUSR1),
    ({**JOB, "SUBMITIT_PREEMPT_SIGNAL": "NOPE"}, None),
])
def test_submitit_signal(env, want):
    assert submitit_signal(env) == want


def cluster(**kw) -> ClusterConfig:
    return ClusterConfig(env={"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"},
                         debug_env={"NCCL_DEBUG": "INFO"}, **kw)


def test_cluster_env_only_in_a_sweep_job():
    environ = {"NCCL_DEBUG": "TRACE"}
    assert sweep_job.apply_cluster_env(cluster(), environ) == {} and environ == {"NCCL_DEBUG": "TRACE"}


def test_cluster_env_wins_over_inherited_values_as_sbatch_exports_do():
    environ = {**JOB, "NCCL_DEBUG": "TRACE"}
    assert sweep_job.apply_cluster_env(cluster(), environ) == {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}
    assert environ == {**JOB, "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}


def test_debug_env_on_top_and_no_nsys_wrapper_variable():
    environ = dict(JOB)
    set_ = sweep_job.apply_cluster_env(cluster(debug=True, nsys=True), environ)
    assert set_ == {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "INFO"} and "MPTK_NSYS" not in environ


@pytest.fixture
def own_signals():
    """Put this process's USR1/USR2 handlers and mask back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for s, handler in saved.items():
        signal.signal(s, handler)


# A rank stand-in: reports whether it started with SIGUSR2 blocked, then saves-and-exits 3 on
# SIGUSR1 (mptk's stop signal) as a worker does.
RANK = """
import signal, sys, time
print(signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, []), flush=True)
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(3))
time.sleep(60)
sys.exit(0)
"""


class Rank:
    """The part of a worker process the handoff uses."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, text=True)
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None


def test_ranks_save_first_then_submitit_handler_runs(own_signals):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # "submitit's"
    found = sweep_job.handoff(JOB)
    assert found is not None and found.signum == signal.SIGUSR2
    with sweep_job.held_for_new_ranks(found):
        rank = Rank()
    assert rank.popen.stdout.readline().strip() == "True"  # started with the signal blocked
    found.started([rank])
    os.kill(os.getpid(), signal.SIGUSR2)  # as Slurm signals the job's launcher
    assert rank.popen.wait(timeout=30) == REQUEUE_EXIT_CODE  # passed on as SIGUSR1
    assert calls == []  # submitit's handler waits for the ranks
    found.finish(REQUEUE_EXIT_CODE)
    assert calls == [signal.SIGUSR2]


def test_a_signal_while_the_ranks_start_is_passed_on_once_they_are_up(own_signals):
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    found = sweep_job.handoff(JOB)
    assert found is not None
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not found.received and time.monotonic() < deadline:
        time.sleep(0.01)
    rank = Rank()
    rank.popen.stdout.readline()
    found.started([rank])
    assert rank.popen.wait(timeout=30) == REQUEUE_EXIT_CODE


def test_no_submitit_handler_when_the_ranks_finished_or_no_signal_came(own_signals):
    calls = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    found = sweep_job.handoff(JOB)
    assert found is not None
    found.finish(REQUEUE_EXIT_CODE)  # a SIGTERM's save: not submitit's to requeue
    found.received = True
    found.finish(0)  # the run ended before it could stop: nothing to requeue
    assert calls == []


def test_rank_ignores_submitit_signal_and_drops_the_block(own_signals):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    sweep_job.ignore_in_rank(JOB)
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    assert signal.SIGUSR2 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    os.kill(os.getpid(), signal.SIGUSR2)  # would end the process if not ignored


def test_nothing_taken_over_outside_a_sweep_job(own_signals):
    assert sweep_job.handoff({}) is None
    sweep_job.ignore_in_rank({})
    assert signal.getsignal(signal.SIGUSR2) is not signal.SIG_IGN
