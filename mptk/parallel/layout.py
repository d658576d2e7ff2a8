"""The layout of a run: how the world splits into parallel groups, derived once.

:func:`derive` is the only place the degrees are computed. What a recipe's ``build`` gets
(:class:`mptk.config.registry.ModelContext`), a rank's data :class:`mptk.data.order.Place`, the
planner's choices and checkpoint manifests are built from a :class:`Layout`, never recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


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
    dp = world // (p.tp * p.pp)
    return Layout(tp=p.tp, pp=p.pp, dp=dp, grad_acc=t.global_batch_size // (t.micro_batch_size * dp),
                  world=world, vpp=p.vpp or 1, stage_layers=tuple(stage_layers), sp=p.sp)
