"""GPU memory evidence: allocator snapshots for a step window and on out-of-memory, and each
rank's peak at the end of the run.

``debug.memory_snapshot=true`` (CUDA only) records the caching allocator's history with
``torch.cuda.memory._record_memory_history`` over the first ``debug.memory_snapshot_steps``
steps of the run, as Megatron-LM's ``--record-memory-history`` and torchtitan's
``enable_memory_snapshot`` do: the first steps allocate the optimizer state and usually reach
the peak. Files, one per rank, for https://pytorch.org/memory_viz:

    run_dir/memory/rank<r>_step<n>.pickle       after completed step n, the window's last
    run_dir/memory/rank<r>_step<n>_oom.pickle   an out-of-memory error in step n (then re-raised)
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch

from mptk.config.schema import DebugConfig
from mptk.log import ranklog

MAX_ENTRIES = 100_000
"""Allocation/free events kept (PyTorch's memory docs and torchtitan use the same): a few
steps of a large model, a pickle of tens to hundreds of MB."""

MIB = 2**20


def snapshot_path(run_dir: str, rank: int, step: int, oom: bool = False) -> Path:
    return Path(run_dir) / "memory" / f"rank{rank}_step{step}{'_oom' if oom else ''}.pickle"


CPU_NOTE = ("debug.memory_snapshot is CUDA-only: this run is on {device}, so no allocator "
            "snapshot is recorded (each rank's peak RSS is still logged at the end)")


class Recorder:
    """Call :meth:`begin` before and :meth:`end` after every step (0-based), run the step inside
    :meth:`guard`, and :meth:`close` at the end of the loop."""

    def __init__(self, cfg: DebugConfig, run_dir: str, rank: int, device: torch.device,
                 first_step: int = 0, say: Callable[[str], None] = ranklog.info):
        self.run_dir, self.rank = run_dir, rank
        self.on = cfg.memory_snapshot and device.type == "cuda"
        steps = cfg.memory_snapshot_steps
        self.last: Optional[int] = first_step + steps if steps > 0 else None
        """First step not recorded (exclusive); None: record to the end."""
        self.recording, self.done = False, first_step
        self.written: list[Path] = []
        if cfg.memory_snapshot and not self.on:
            say(CPU_NOTE.format(device=device.type))

    def begin(self, step: int) -> None:
        if self.on and not self.recording and (self.last is None or step < self.last):
            torch.cuda.memory._record_memory_history(
                enabled="all", context="all", stacks="python", max_entries=MAX_ENTRIES)
            self.recording = True

    def end(self, step: int) -> None:
        self.done = step + 1
        if self.recording and self.last is not None and self.done >= self.last:
            self._dump(self.done)
            self._stop()

    @contextlib.contextmanager
    def guard(self, step: int) -> Iterator[None]:
        """Around step ``step`` (0-based): an out-of-memory error writes a snapshot (with the
        history when it is still being recorded; the allocator's segments in any case), then
        goes on up."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if self.on:
                path = self._dump(step + 1, oom=True)
                ranklog.error(f"mptk: error: CUDA out of memory in step {step + 1} on rank "
                              f"{self.rank}; allocator snapshot in {path} (https://pytorch.org/memory_viz)")
                self._stop()
            raise

    def close(self) -> None:
        """The run ended inside the window: dump what was recorded."""
        if self.recording:
            self._dump(self.done)
            self._stop()

    def _dump(self, step: int, oom: bool = False) -> Path:
        path = snapshot_path(self.run_dir, self.rank, step, oom)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        self.written.append(path)
        ranklog.info(f"memory snapshot of rank {self.rank} after step {step}: {path}")
        return path

    def _stop(self) -> None:
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False


# --------------------------------------------------------------------------- peaks


def peaks(device: torch.device) -> dict[str, float]:
    """This rank's peak memory in MiB: CUDA allocated and reserved, or the process's RSS."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated() / MIB,
                "reserved": torch.cuda.max_memory_reserved() / MIB}
    return {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def summary(table: list[dict[str, float]]) -> str:
    """One line from every rank's :func:`peaks`, e.g. ``peak memory over 2 ranks (MiB):
    allocated max 1,234 (rank 1) min 1,200 (rank 0); reserved ...``."""
    parts = []
    for kind in table[0]:
        values = [row[kind] for row in table]
        high, low = values.index(max(values)), values.index(min(values))
        parts.append(f"{kind} max {values[high]:,.0f} (rank {high}) min {values[low]:,.0f} (rank {low})")
    return f"peak memory over {len(table)} rank(s) (MiB): " + "; ".join(parts)


def report_peaks(device: torch.device, rank: int, say: Callable[[str], None]) -> str:
    """Every rank logs its own peaks; ``say`` gets the summary over ranks. A collective (on
    the device, so NCCL can carry it): every rank calls it once at the end of the run."""
    import torch.distributed as dist

    mine = peaks(device)
    ranklog.info(f"peak memory of rank {rank} (MiB): "
                 + ", ".join(f"{k} {v:,.0f}" for k, v in mine.items()))
    local = torch.tensor(list(mine.values()), dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    table = [dict(zip(mine, t.tolist())) for t in gathered]
    line = summary(table)
    say(line)
    return line
