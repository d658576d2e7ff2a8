"""The layout of a run: how the world splits into parallel groups, derived once.

:func:`derive` is the only place the degrees are computed. What a recipe's ``build`` gets
(:class:`mptk.config.registry.ModelContext`), a rank's data :class:`mptk.data.order.Place`, the
planner's choices and checkpoint manifests are built from a :class:`Layout`, never recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mptk.config.checks import sequence_parallel


@dataclass(frozen=True, slots=True)
class Layout:
    """How the world splits: world = tp * cp * pp * dp; global batch = micro * grad_acc * dp."""

    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    dp: int
    """Data-parallel replicas (DeepSpeed's world)."""
    grad_acc: int
    """Micro-batches per rank per step."""
    world: int
    """Processes in the run."""
    vpp: int = 1
    """Model chunks per pp rank (interleaved schedule when > 1)."""
    stage_layers: tuple[int, ...] = ()
    """Transformer layers per virtual stage (pp > 1)."""
    cp: int = 1
    """Context-parallel degree (each sequence split over cp ranks)."""
    ep: int = 1
    """Expert-parallel degree (MoE experts split over ep ranks)."""
    sp: bool = False
    """Sequence parallelism inside the tensor-parallel group."""

    def describe(self) -> str:
        """One line for logs, manifests and errors."""
        return (f"tp={self.tp} pp={self.pp} vpp={self.vpp} cp={self.cp} ep={self.ep} "
                f"dp={self.dp} world={self.world}")

    def degrees(self) -> dict[str, Any]:
        """Every field as a plain dict (manifests)."""
        return asdict(self)


def derive(cfg: Any, world: int, stage_layers: Sequence[int] = ()) -> Layout:
    """The layout of a checked ``cfg`` (a ``RunConfig``) at ``world`` processes."""
    p, t = cfg.parallel, cfg.train
    dp = world // (p.tp * p.cp * p.pp)
    return Layout(tp=p.tp, pp=p.pp, dp=dp, grad_acc=t.global_batch_size // (t.micro_batch_size * dp),
                  world=world, vpp=p.vpp or 1, stage_layers=tuple(stage_layers), cp=p.cp,
                  sp=sequence_parallel(p, cfg.model), ep=p.ep)


def cp_chunks(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of ``2 * cp`` equal sequence chunks that cp rank ``cp_rank`` holds.

    megatron's load-balanced order (rank r: chunks r and 2cp-1-r, so that under a causal mask
    every rank has the same work). It is megatron's RoPE slicing
    (``get_pos_emb_on_this_cp_rank``), so the data slice, the positions and the all-to-all's
    reordering must all use it: this is the one definition mptk uses for each.
    """
    return cp_rank, 2 * cp - 1 - cp_rank


def cp_positions(seq_length: int, cp: int, cp_rank: int) -> list[int]:
    """Sequence positions held by cp rank ``cp_rank`` (in its local order)."""
    if cp == 1:
        return list(range(seq_length))
    size = seq_length // (2 * cp)
    return [c * size + i for c in cp_chunks(cp, cp_rank) for i in range(size)]
