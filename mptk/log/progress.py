"""Rank 0's console progress: a ``rich`` progress bar with the step count, elapsed time
and ETA while the console is a terminal; the metrics lines print above it. In a log file (Slurm,
CI) there is no bar: the metrics line carries ``eta`` instead."""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mptk.log import ranklog


def eta_seconds(done: int, elapsed_s: float, remaining_steps: int) -> Optional[float]:
    """Remaining time at the mean step time of this run so far (None before the first step)."""
    return elapsed_s / done * remaining_steps if done > 0 else None


def format_eta(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


class Bar:
    """Start with :meth:`start`, move with :meth:`update`, end with :meth:`stop`. Does nothing
    unless ``active`` and the console is a terminal."""

    def __init__(self, total: int, done: int, active: bool, console: Optional[Console] = None):
        self.console = console or Console()
        self.total, self.done = total, done
        self.on = active and self.console.is_terminal
        self._progress: Optional[Progress] = None

    def start(self) -> Bar:
        if not self.on:
            return self
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self._task = self._progress.add_task("train", total=self.total, completed=self.done)
        self._progress.start()
        ranklog.console_to(sys.stdout)  # rich's proxy now: lines print above the bar
        return self

    def update(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            ranklog.console_to(None)
