"""The global sample order every data source shares.

Global sample ``g`` of micro-batch ``micro`` on dp rank ``r`` at step ``s`` is
``s * global_batch + micro * mbs * dp + r * mbs + row`` (row < mbs): a pure function of the
step, so tp/pp peers read the same samples, the union of one step over dp does not depend on
dp, and a run resumed at step ``k`` reads what an uninterrupted one would (consumed samples =
step * global batch).
"""

from __future__ import annotations


def global_samples(step: int, micro: int, micro_batch_size: int, grad_acc: int,
                   dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of one micro-batch on one dp rank."""
    if not 0 <= dp_rank < dp_size or not 0 <= micro < grad_acc:
        raise ValueError(f"bad dp_rank {dp_rank}/{dp_size} or micro {micro}/{grad_acc}")
    global_batch = micro_batch_size * grad_acc * dp_size
    base = step * global_batch + micro * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return [base + row for row in range(micro_batch_size)]
