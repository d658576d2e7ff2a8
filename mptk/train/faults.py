"""Fault injection for tests: environment variables that make a run fail on purpose, so the
end-to-end tests can check that NaN checks, the hang watchdog and preemption really work.

The trainer calls one :class:`Faults` at named points of every step; none of them does
anything unless its variable is set. Not for production use. Steps are 1-based, as in
``metrics.jsonl``.

- ``MPTK_TEST_HANG_RANK=r`` with ``MPTK_TEST_HANG_AT_STEP=k`` (:meth:`Faults.before_step`):
  rank r sleeps forever before running step k, so its peers block in the next collective.
- ``MPTK_TEST_NAN_AT_STEP=k`` (:meth:`Faults.loss`): step k's loss becomes NaN.
- ``MPTK_TEST_SIGTERM_AFTER_STEP=k`` (:meth:`Faults.after_step`): after step k, rank 0 sends
  SIGTERM to its parent (the launcher), which forwards it to every worker.
- ``MPTK_TEST_CRASH_IN_SAVE=R[@S]``: rank R kills itself mid-save. It fires inside the
  checkpoint writer, so it lives in :mod:`mptk.checkpoint.writer` (a lower layer that cannot
  import this module).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

HANG_RANK_ENV = "MPTK_TEST_HANG_RANK"
HANG_STEP_ENV = "MPTK_TEST_HANG_AT_STEP"
NAN_ENV = "MPTK_TEST_NAN_AT_STEP"
SIGTERM_ENV = "MPTK_TEST_SIGTERM_AFTER_STEP"

_sent_sigterm: list[int] = []
"""Steps after which this process already sent the test SIGTERM (it is sent once: the old
call site in the checkpoint code and the trainer may both ask)."""


def _int(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name)
    return int(value) if value not in (None, "") else None


def test_hang() -> None:
    """Sleep forever. The hang test looks for this frame's name in the watchdog's stack dump."""
    while True:
        time.sleep(3600)


def sigterm_launcher(step: int, rank: int, wanted: Optional[int]) -> None:
    """Rank 0 sends SIGTERM to its parent after step ``wanted`` (once per process)."""
    if wanted is not None and rank == 0 and step == wanted and not _sent_sigterm:
        _sent_sigterm.append(step)
        os.kill(os.getppid(), signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults armed for this rank, read from the environment once at setup."""

    rank: int
    hang_at: Optional[int] = None
    """Step before which this rank hangs (only when ``MPTK_TEST_HANG_RANK`` names it)."""
    nan_at: Optional[int] = None
    sigterm_after: Optional[int] = None

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] = os.environ) -> Faults:
        """The faults the ``MPTK_TEST_*`` variables ask of ``rank``."""
        hangs_here = _int(environ, HANG_RANK_ENV) == rank
        return cls(rank=rank, hang_at=_int(environ, HANG_STEP_ENV) if hangs_here else None,
                   nan_at=_int(environ, NAN_ENV), sigterm_after=_int(environ, SIGTERM_ENV))

    def before_step(self, step: int) -> None:
        """Before step ``step`` runs: hang here when asked to."""
        if self.hang_at == step:
            test_hang()

    def loss(self, step: int, loss: float) -> float:
        """Step ``step``'s loss as the NaN check sees it: NaN when asked to."""
        return float("nan") if self.nan_at == step else loss

    def after_step(self, step: int) -> None:
        """After step ``step``, before the stop/save decision: the test SIGTERM."""
        sigterm_launcher(step, self.rank, self.sigterm_after)
