"""TensorBoard scalars: the rows of ``metrics.jsonl`` as event files under
``run_dir/tensorboard/`` (rank 0), for sites that read runs with ``tensorboard --logdir``
rather than W&B. One scalar per numeric key, tagged with the key itself, at the row's step."""

from __future__ import annotations

from pathlib import Path

SKIPPED = ("step", "steps")
"""Row keys that are not figures (the step is the scalar's x axis)."""


def log_dir(run_dir: str) -> Path:
    return Path(run_dir) / "tensorboard"


def scalars(row: dict) -> dict[str, float]:
    """The numeric figures of a metrics row (strings, lists and None are left out)."""
    return {k: float(v) for k, v in row.items()
            if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    """A ``SummaryWriter`` over ``run_dir/tensorboard``. A resumed run passes its first step
    as ``purge_step``: TensorBoard then hides what an interrupted earlier attempt wrote at or
    after that step, as ``metrics.jsonl`` readers see the resumed steps."""

    def __init__(self, run_dir: str, purge_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir(run_dir)), purge_step=purge_step or None)

    def log(self, row: dict, flush: bool = False) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()

