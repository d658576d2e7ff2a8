"""A job of Hydra's submitit launcher (``mptk-train -m hydra/launcher=submitit_slurm``): one Slurm
task per sweep point, whose launcher spawns the run's ranks (:mod:`mptk.launch.local`).

Two things an sbatch job of mptk gets from its script, such a job gets here:

* the cluster profile's variables (``cluster.env``, and ``cluster.debug_env`` when
  ``cluster.debug``), set in the launcher before its preflight and before any rank starts
  (:func:`apply_cluster_env`);
* save and requeue before the time limit. submitit sends its signal (SIGUSR2 unless
  ``SUBMITIT_PREEMPT_SIGNAL`` names another) ``hydra.launcher.signal_delay_s`` before the limit
  to every process of the job, and its own handler requeues the job at once. Here the ranks
  ignore that signal, the launcher passes it on as mptk's SIGUSR1 (finish the step, save, exit
  3), and only once every rank has saved does submitit's handler run (:class:`Handoff`): it
  requeues the job, which runs the same sweep point again and resumes from that checkpoint
  (``train.resume=auto``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from mptk.config.checks import submitit_job, submitit_signal
from mptk.config.schema import ClusterConfig
from mptk.exitcodes import REQUEUE_EXIT_CODE
from mptk.launch.slurm import cluster_env


def apply_cluster_env(c: ClusterConfig,
                      environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """In a submitit sweep job, set the profile's variables in ``environ`` (this process's by
    default); like the exports of an sbatch script they win over inherited values. Returns
    what was set ({} outside such a job)."""
    environ = os.environ if environ is None else environ
    if not submitit_job(environ):
        return {}
    values = {name: str(value) for name, value in cluster_env(c).items()}
    environ.update(values)
    return values


@dataclass(slots=True)
class Handoff:
    """submitit's signal in the launcher of a sweep job: the ranks save on it first, then
    submitit's own handler (checkpoint the job's callable, requeue) gets it."""

    signum: signal.Signals
    submitit_handler: Any
    """What submitit installed for ``signum`` (``SignalHandler.checkpoint_and_try_requeue``)."""
    procs: list = field(default_factory=list)
    """The ranks the signal is passed on to (as SIGUSR1)."""
    received: bool = False

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True
        self._forward()

    def _forward(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGUSR1)

    def started(self, procs: list) -> None:
        """The ranks are up: pass on a signal that came while they were starting."""
        self.procs.extend(procs)
        if self.received:
            self._forward()

    def finish(self, code: int) -> None:
        """After the ranks exited with ``code``: when they saved for submitit's signal (exit 3),
        run submitit's handler, which requeues the job and exits (or raises why it will not)."""
        if not (self.received and code == REQUEUE_EXIT_CODE and callable(self.submitit_handler)):
            return
        print(f"mptk: checkpoint saved on submitit's {self.signum.name}; submitit requeues this "
              "job, which resumes from it", flush=True)
        self.submitit_handler(self.signum, None)


def handoff(environ: Optional[Mapping[str, str]] = None) -> Optional[Handoff]:
    """In a submitit sweep job (``environ``: this process's by default), take over submitit's
    signal in this, the launcher's, process; None elsewhere."""
    signum = submitit_signal(os.environ if environ is None else environ)
    if signum is None:
        return None
    found = Handoff(signum=signum, submitit_handler=signal.getsignal(signum))
    signal.signal(signum, found._note)
    return found


@contextmanager
def held_for_new_ranks(found: Optional[Handoff]) -> Iterator[None]:
    """Ranks started inside start with submitit's signal blocked (a spawned process keeps the
    signal mask of the thread that forked it), so the signal cannot end one before
    :func:`ignore_in_rank` runs there. The launcher still gets it: its handler is in already,
    and the signal goes to another thread meanwhile or waits for the unblock."""
    if found is None:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {found.signum})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_in_rank(environ: Optional[Mapping[str, str]] = None) -> None:
    """In a rank of a submitit sweep job: ignore submitit's signal (the launcher passes it on as
    SIGUSR1) and drop the block it started with; the rank's own helper processes inherit the
    ignoring."""
    signum = submitit_signal(os.environ if environ is None else environ)
    if signum is not None:
        signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
