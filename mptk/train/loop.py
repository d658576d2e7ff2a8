"""A worker's entry point: :func:`run` sets up a :class:`~mptk.train.trainer.Trainer`, runs
its loop and ends the process.

The run itself lives in :mod:`mptk.train.trainer`; the names that launchers, tools and tests
import from here (``setup``, ``build_model``, ``one_step``, ``one_eval``, ...) are re-exported.
"""

from __future__ import annotations

from mptk.config.schema import RunConfig
from mptk.exitcodes import REQUEUE_EXIT_CODE
from mptk.log.noise import quiet
from mptk.parallel import groups
from mptk.parallel.env import DistEnv
from mptk.train import signals
from mptk.train.trainer import (
    Trainer,
    Worker,
    agree_run_dir,
    batch_ids,
    build_model,
    model_context,
    one_eval,
    one_step,
    parameter_count,
    rank_zero_first,
    say,
    setup,
)

__all__ = ["Trainer", "Worker", "agree_run_dir", "batch_ids", "build_model", "model_context",
           "one_eval", "one_step", "parameter_count", "rank_zero_first", "run", "say", "setup"]


def run(cfg: RunConfig, env: DistEnv) -> None:
    """Entry of every worker; ends the process (see :func:`groups.finish`)."""
    quiet()
    # Before setup: a stop signal that arrives while setting up is honoured after the first step.
    signals.install()
    code = 1  # anything raised before close() is a failure: traceback, no waiting on peers
    try:
        trainer = Trainer.setup(cfg, env)
        code = trainer.close(trainer.fit())
    finally:
        groups.finish(code) if code in (0, REQUEUE_EXIT_CODE) else _abort(code)


def _abort(code: int) -> None:
    """On failure: print the traceback, then exit without waiting on peers."""
    import os
    import sys
    import traceback

    traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)
