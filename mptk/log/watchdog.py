"""Run health: a NaN/Inf check on every step's loss and gradient norm, and a hang watchdog
that dumps every thread's Python stack and torch's flight recorder (the rank's last
collectives) and exits instead of hanging (the fault-injection hooks that test both live in
:mod:`mptk.train.faults`)."""

from __future__ import annotations

import faulthandler
import json
import math
import os
import pickle
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


# --------------------------------------------------------------------------- flight recorder

FLIGHT_RECORDER_BUFFER = 2000
"""Collectives each rank keeps (torch's default; a few hundred bytes each)."""


def flight_recorder_prefix(run_dir: str) -> Path:
    """``<prefix><rank>`` is one rank's dump, as torch names them (``torchfrtrace DIR`` reads
    the folder)."""
    return Path(run_dir) / "flight_recorder" / "rank_"


def flight_recorder_env(run_dir: str) -> dict[str, str]:
    """Variables for torch's flight recorder (torch 2.13's names; ``TORCH_NCCL_TRACE_BUFFER_SIZE``
    and ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE`` are the older ones it still reads after these):
    the buffer, NCCL's own dump on a collective timeout, and where dumps go (the run dir)."""
    return {"TORCH_FR_BUFFER_SIZE": str(FLIGHT_RECORDER_BUFFER),
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(flight_recorder_prefix(run_dir))}


def flight_recorder_bytes() -> Optional[bytes]:
    """This process's flight recorder as torch pickles it: NCCL's recorder when NCCL is the
    backend, else the generic one (gloo's collectives, torch >= 2.8); None without either."""
    import torch.distributed as dist
    from torch._C import _distributed_c10d as c10d

    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    dump = getattr(c10d, "_dump_nccl_trace" if nccl else "_dump_fr_trace", None)
    return dump() if dump is not None else None


def dump_flight_recorder(run_dir: str, rank: int) -> list[str]:
    """Write ``run_dir/flight_recorder/rank_<r>``; lines for the hang report: where it is and
    this rank's last collectives (oldest first), or why there is none."""
    try:
        raw = flight_recorder_bytes()
    except Exception as err:  # noqa: BLE001 - a failed dump must not hide the stacks
        return [f"flight recorder: not dumped ({type(err).__name__}: {err})"]
    if raw is None:
        return ["flight recorder: none in this torch build"]
    path = Path(f"{flight_recorder_prefix(run_dir)}{rank}")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_bytes(raw)
    part.replace(path)  # NCCL's own dump-on-timeout may write the same file: never half of one
    entries = pickle.loads(raw).get("entries", [])
    lines = [f"flight recorder: {len(entries)} entries in {path} "
             f"(NCCL dumps of all ranks: torchfrtrace {path.parent} -j); the last ones:"]
    return lines + [describe_entry(e) for e in entries[-5:]]


def describe_entry(entry: dict) -> str:
    """``  seq 12 gloo:all_reduce [[64]] state scheduled (pg 0 default_pg)``."""
    group = "/".join(str(x) for x in entry.get("process_group", ()))
    return (f"  seq {entry.get('collective_seq_id')} {entry.get('profiling_name')} "
            f"{entry.get('input_sizes')} state {entry.get('state')} (pg {group})")


# --------------------------------------------------------------------------- hang watchdog


class Watchdog:
    """A daemon thread per rank: when no :meth:`beat` comes for ``timeout_s`` seconds it writes
    every thread's stack to ``run_dir/hang/rank_<r>.txt``, then the flight recorder (see
    :func:`dump_flight_recorder`), and exits the process. Each rank has its own timer, so in a
    collective hang every rank dumps."""

    def __init__(self, timeout_s: float, run_dir: str, rank: int):
        self.timeout_s, self.rank, self.run_dir = timeout_s, rank, run_dir
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
            f.write("\n".join(dump_flight_recorder(self.run_dir, self.rank)) + "\n")
        ranklog.error(f"mptk: error: hang on rank {self.rank}: no step completed for {waited:.0f} s "
                      f"after step {self.step}; stacks and the flight recorder's last "
                      f"collectives in {self.path}")
        os._exit(HANG_EXIT_CODE)
