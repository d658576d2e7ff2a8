"""Exit codes a training process uses to tell its launcher what to do next.

The sbatch scripts rendered by :mod:`mptk.launch.slurm` read srun's exit status: when it is
:data:`REQUEUE_EXIT_CODE` they run ``scontrol requeue $SLURM_JOB_ID`` (up to
``cluster.requeue_max`` times) and the requeued job resumes from the checkpoint in the same
run dir. srun reports this code only when every task exits with it: a task killed by a signal
(137, 143) or failing (1) wins, and such a job is not requeued.
"""

from __future__ import annotations

OK = 0
"""Training finished."""

CONFIG_ERROR = 2
"""Bad config or layout (one line on stderr); requeueing would fail the same way."""

REQUEUE_EXIT_CODE = 3
"""Saved a checkpoint (e.g. on SIGUSR1 before the time limit, or on preemption): please requeue.
Every rank must exit with it, after the save has completed everywhere."""

NONFINITE_EXIT_CODE = 4
"""A non-finite loss or gradient norm under ``debug.nan_policy=stop`` (rank and step logged)."""

HANG_EXIT_CODE = 5
"""The hang watchdog fired: no step completed within ``debug.hang_timeout_s``; stacks of every
rank in ``run_dir/hang/``."""

INTERRUPTED_EXIT_CODE = 130
"""A second Ctrl-C: stopped at once, nothing saved (the shell's 128 + SIGINT)."""
