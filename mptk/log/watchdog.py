"""Run health: a NaN/Inf check on every step's loss and gradient norm, and a hang watchdog
that dumps every thread's Python stack and exits instead of hanging (the fault-injection
hooks that test both live in :mod:`mptk.train.faults`)."""

from __future__ import annotations

import faulthandler
import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from mptk.config.schema import DebugConfig, NanPolicy
from mptk.exitcodes import HANG_EXIT_CODE, NONFINITE_EXIT_CODE
from mptk.log import ranklog


def nonfinite(loss: float, norm: Optional[float]) -> list[str]:
    """Names of the figures that are NaN or infinite."""
    figures = {"loss": loss, "grad_norm": norm}
    return [f"{k}={v}" for k, v in figures.items() if v is not None and not math.isfinite(v)]


def check_finite(cfg: DebugConfig, step: int, rank: int, loss: float,
                 norm: Optional[float], run_dir: Optional[str] = None,
                 batch: Optional[Callable[[], dict]] = None) -> bool:
    """True when loss and norm are finite; else log rank and step, write ``batch()`` (this
    rank's sample ids) to ``run_dir/nan/rank_<r>.json`` when ``debug.nan_dump`` and, under
    ``nan_policy=stop``, end this process with :data:`NONFINITE_EXIT_CODE`."""
    bad = nonfinite(loss, norm)
    if not bad:
        return True
    stop = cfg.nan_policy is NanPolicy.stop
    ranklog.error(f"mptk: error: non-finite {', '.join(bad)} at step {step} on rank {rank} "
                  f"(debug.nan_policy={cfg.nan_policy.value}: {'stopping' if stop else 'skipping'})")
    if cfg.nan_dump and run_dir and batch is not None:
        ranklog.error(f"mptk: batch ids of step {step}: {dump_batch(run_dir, rank, step, batch())}")
    if stop:
        os._exit(NONFINITE_EXIT_CODE)
    return False


def dump_batch(run_dir: str, rank: int, step: int, record: dict) -> Path:
    """``run_dir/nan/rank_<r>.json``: one JSON line per bad step (appended)."""
    path = Path(run_dir) / "nan" / f"rank_{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "rank": rank, **record}) + "\n")
    return path


class Watchdog:
    """A daemon thread per rank: when no :meth:`beat` comes for ``timeout_s`` seconds it writes
    every thread's stack to ``run_dir/hang/rank_<r>.txt`` and exits the process. Each rank has
    its own timer, so in a collective hang every rank dumps."""

    def __init__(self, timeout_s: float, run_dir: str, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.path = Path(run_dir) / "hang" / f"rank_{rank}.txt"
        self.last, self.step = time.monotonic(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mptk-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """A step completed."""
        self.last, self.step = time.monotonic(), step

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            if time.monotonic() - self.last > self.timeout_s:
                self._fire()

    def _fire(self) -> None:
        waited = time.monotonic() - self.last
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as f:
            f.write(f"rank {self.rank}: no step completed for {waited:.0f} s "
                    f"(debug.hang_timeout_s={self.timeout_s:g}); last completed step {self.step}\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        ranklog.error(f"mptk: error: hang on rank {self.rank}: no step completed for {waited:.0f} s "
                      f"after step {self.step}; stacks in {self.path}")
        os._exit(HANG_EXIT_CODE)
