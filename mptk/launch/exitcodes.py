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
