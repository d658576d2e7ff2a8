"""Stop requests: SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT) ask a run to finish its step,
save and exit 3; a second Ctrl-C ends the process at once (exit 130).

A handler only notes the signal. Ranks get it at different times (or not at all), so after
every step :func:`agree_stop` takes the MAX of the local flags over the world: all ranks see
the same answer at the same step, save the same checkpoint and leave together.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

from mptk.exitcodes import INTERRUPTED_EXIT_CODE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Signals that mean: save and stop (Slurm sends SIGUSR1 before the time limit, SIGTERM on
preemption/scancel; the local launcher forwards both, and a Ctrl-C as SIGTERM)."""


_received: list[int] = []


def _note(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        os._exit(INTERRUPTED_EXIT_CODE)  # a second Ctrl-C: leave now, no save
    _received.append(signum)


def install() -> None:
    """Note stop signals from now on (main thread only; call early in a worker)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note)
        signal.siginterrupt(sig, False)  # restart interrupted system calls (e.g. inside gloo)


def received() -> Optional[int]:
    """The first stop signal this process got, or None."""
    return _received[0] if _received else None


def reset() -> None:
    """Forget received signals (tests)."""
    _received.clear()


def agree_stop() -> bool:
    """True on every rank when any rank got a stop signal (a collective: call on all ranks)."""
    if not dist.is_initialized():
        return bool(_received)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if _received else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
