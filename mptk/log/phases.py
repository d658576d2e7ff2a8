"""Per-phase step timers: where each rank spends a step, and which rank is slowest.

Phases (seconds per step, averaged over a log window):

- ``data``: building this rank's micro-batches and moving them to the device;
- ``forward`` / ``backward``: compute (``backward`` excludes the gradient reduce below);
- ``grad_reduce``: DeepSpeed's data-parallel gradient reduction that is *not* overlapped with
  backward (``engine.allreduce_gradients``: all of it at ZeRO-0/1, the epilogue at ZeRO-2/3),
  plus the tied-embedding sum at pp>1;
- ``optimizer``: ``engine.step()`` (clipping, the update, ZeRO's all-gather of parameters);
- ``p2p_wait``: pipeline sends and receives (pp>1; megatron's schedule reports them through the
  ``config.timers`` protocol, which :class:`Phases` also speaks).

A span nested in another is subtracted from its parent, so the phases add up to no more than
the step. Each span is also a ``torch.profiler.record_function`` range named ``mptk.<phase>``
(it shows in profiler traces) and, on CUDA, an NVTX range (Nsight Systems). On CUDA the clock is
CUDA events read once per log window, so timing adds no host-device sync to a step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist

PHASES = ("data", "forward", "backward", "grad_reduce", "optimizer", "p2p_wait")
COMPUTE = ("forward", "backward", "optimizer")
"""What a straggler is slow at: waiting phases are the victims of a slow peer, not the cause."""

_MEGATRON = {"forward-compute": "forward", "backward-compute": "backward"}


def phase_of(megatron_name: str) -> Optional[str]:
    """mptk phase of a megatron timer name (``None``: not a phase, e.g. ``forward-backward``)."""
    if megatron_name in _MEGATRON:
        return _MEGATRON[megatron_name]
    return "p2p_wait" if "send" in megatron_name or "recv" in megatron_name else None


class _Timer:
    """One megatron ``Timers`` entry: ``start()``/``stop()`` open and close a phase span."""

    def __init__(self, phases: Phases, phase: Optional[str]):
        self.phases, self.phase = phases, phase

    def start(self, barrier: bool = False) -> None:
        if self.phase is not None:
            self.phases.start(self.phase)

    def stop(self, barrier: bool = False) -> None:
        if self.phase is not None:
            self.phases.stop(self.phase)


class Phases:
    """This rank's phase spans since the last :meth:`window`."""

    def __init__(self, cuda: bool = False):
        self.cuda, self.active, self.steps = cuda, True, 0
        self._open: list[list] = []  # [phase, start, child intervals, profiler range]
        self._done: list[tuple] = []  # (phase, start, end, child intervals)

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()  # elapsed_time needs both events done (a no-op after window's sync)
        return start.elapsed_time(end) / 1000.0

    def start(self, phase: str) -> None:
        if not self.active:
            return
        scope = torch.profiler.record_function(f"mptk.{phase}")
        scope.__enter__()
        if self.cuda:
            torch.cuda.nvtx.range_push(f"mptk.{phase}")
        self._open.append([phase, self._now(), [], scope])

    def stop(self, phase: str) -> None:
        """Close the innermost open span of ``phase``."""
        found = [i for i, span in enumerate(self._open) if span[0] == phase]
        if not self.active or not found:
            return
        name, start, children, scope = self._open.pop(found[-1])
        end = self._now()
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        scope.__exit__(None, None, None)
        self._done.append((name, start, end, children))
        if self._open:
            self._open[-1][2].append((start, end))

    @contextmanager
    def span(self, phase: str):
        self.start(phase)
        try:
            yield
        finally:
            self.stop(phase)

    @contextmanager
    def paused(self):
        """Record nothing inside (evaluation goes through the same schedule)."""
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

    def __call__(self, name: str, log_level: Optional[int] = None) -> _Timer:
        """megatron's ``Timers`` protocol (``config.timers(name).start()``)."""
        return _Timer(self, phase_of(name))

    def mark(self) -> int:
        """A position to total from (see :meth:`seconds_since`)."""
        return len(self._done)

    def seconds_since(self, mark: int, phase: str) -> float:
        """Exclusive seconds of ``phase`` in spans closed after ``mark``."""
        return sum(self._exclusive(s) for s in self._done[mark:] if s[0] == phase)

    def _exclusive(self, span: tuple) -> float:
        _, start, end, children = span
        return self._seconds(start, end) - sum(self._seconds(a, b) for a, b in children)

    def step_done(self) -> None:
        self.steps += 1

    def window(self) -> dict[str, float]:
        """Mean seconds per step of every phase since the last call, then reset."""
        if self.cuda and self._done:
            torch.cuda.synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for span in self._done:
            totals[span[0]] = totals.get(span[0], 0.0) + self._exclusive(span)
        steps, self.steps, self._done = max(self.steps, 1), 0, []
        return {name: value / steps for name, value in totals.items()}


def across_ranks(mine: dict[str, float], group=None) -> dict:
    """``<phase>_s_min`` / ``<phase>_s_max`` over the ranks of ``group`` (default: all), and the
    slowest rank by compute time (``straggler_rank``, ``straggler_compute_s``). A collective:
    every rank of the group calls it at the same step."""
    names = list(PHASES)
    local = torch.tensor([mine.get(n, 0.0) for n in names], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # [ranks, phases]
    return summarize(table, names, dist.get_process_group_ranks(group) if group else None)


def summarize(table: torch.Tensor, names: list[str], ranks: Optional[list[int]] = None) -> dict:
    """Min/max per phase and the straggler from a ``[ranks, phases]`` table of seconds."""
    out = {}
    for i, name in enumerate(names):
        out[f"{name}_s_min"] = float(table[:, i].min())
        out[f"{name}_s_max"] = float(table[:, i].max())
    compute = table[:, [names.index(n) for n in COMPUTE]].sum(dim=1)
    slowest = int(compute.argmax())
    out["straggler_rank"] = ranks[slowest] if ranks else slowest
    out["straggler_compute_s"] = float(compute[slowest])
    return out
