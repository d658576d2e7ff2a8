"""This process's rank and the few collectives checkpoint code needs.

Every helper also works without a process group (``mptk-ckpt`` and the unit tests run in one
plain process), which is why they are not taken from :mod:`mptk.parallel.groups`: those read
megatron's parallel state, which a one-process tool never sets up.
"""

from __future__ import annotations

import sys

import torch.distributed as dist


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """Processes in the run (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def from_rank0(value):
    """Rank 0's ``value`` on every rank: one rank reads the disk, so all ranks agree even when
    the directory changes while they look (a collective)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order (a collective)."""
    if not dist.is_initialized():
        return [value]
    parts = [None] * world()
    dist.all_gather_object(parts, value)
    return parts


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def say(text: str) -> None:
    """One console line, from rank 0 only (every rank would repeat it)."""
    if rank() == 0:
        print(f"mptk: {text}", flush=True)


def warn(text: str) -> None:
    """One warning line on stderr, from rank 0 only."""
    if rank() == 0:
        print(f"mptk: warning: {text}", file=sys.stderr, flush=True)
