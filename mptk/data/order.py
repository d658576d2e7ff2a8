"""The global sample order every data source shares.

Global sample ``g`` of micro-batch ``micro`` on dp rank ``r`` at step ``s`` is
``s * global_batch + micro * mbs * dp + r * mbs + row`` (row < mbs): a pure function of the
step, so tp/pp peers read the same samples, the union of one step over dp does not depend on
dp, and a run resumed at step ``k`` reads what an uninterrupted one would (consumed samples =
step * global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def global_samples(step: int, micro: int, micro_batch_size: int, grad_acc: int,
                   dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of one micro-batch on one dp rank."""
    if not 0 <= dp_rank < dp_size or not 0 <= micro < grad_acc:
        raise ValueError(f"bad dp_rank {dp_rank}/{dp_size} or micro {micro}/{grad_acc}")
    global_batch = micro_batch_size * grad_acc * dp_size
    base = step * global_batch + micro * micro_batch_size * dp_size + dp_rank * micro_batch_size
    return [base + row for row in range(micro_batch_size)]


@dataclass(frozen=True, slots=True)
class Place:
    """Where one dp rank reads: its micro-batch shape in the global order and its eval share
    (the binding every data source of the loop shares)."""

    micro_batch_size: int
    grad_acc: int
    dp_rank: int
    dp_size: int
    eval_batches: int
    """Held-out micro-batches per rank per evaluation (``train.eval_batches``)."""
    cp_rank: int = 0
    """This rank's place in its context-parallel group (which part of each sequence)."""
    cp_size: int = 1
    """Context-parallel degree: cp peers read the same samples, each its own tokens."""

    @classmethod
    def of(cls, cfg, layout, dp_rank: Optional[int] = None) -> Place:
        """This rank's place for ``cfg.train`` and ``layout`` (dp and cp rank from the groups)."""
        from mptk.parallel import groups

        if dp_rank is None:
            dp_rank = groups.dp_rank()
        cp = getattr(layout, "cp", 1)
        return cls(micro_batch_size=cfg.train.micro_batch_size, grad_acc=layout.grad_acc,
                   dp_rank=dp_rank, dp_size=layout.dp, eval_batches=cfg.train.eval_batches,
                   cp_rank=groups.cp_rank() if cp > 1 else 0, cp_size=cp)

    def cut(self, batch: dict) -> dict:
        """This cp rank's tokens of every ``[b, seq]`` tensor, plus their ``positions`` (the
        load-balanced chunks megatron's RoPE also picks); the batch itself at cp=1."""
        if self.cp_size == 1:
            return batch
        import torch

        from mptk.parallel.layout import cp_positions

        seq = batch["tokens"].shape[1]
        index = torch.tensor(cp_positions(seq, self.cp_size, self.cp_rank))
        out = {k: v.index_select(1, index) if torch.is_tensor(v) and v.dim() == 2 else v
               for k, v in batch.items()}
        out["positions"] = index.expand(batch["tokens"].shape[0], -1)
        return out

    def samples(self, step: int, micro: int) -> list[int]:
        """Global sample indices of micro-batch ``micro`` of ``step`` on this rank."""
        return global_samples(step, micro, self.micro_batch_size, self.grad_acc,
                              self.dp_rank, self.dp_size)
