"""mptk-plan: memory and step time of a training layout before any GPU is touched.

``plan(cfg, cluster)`` gives a :class:`Plan` (memory per GPU by item, step time by part,
tokens/s, MFU, a verdict) of a typed :class:`RunConfig`; :mod:`mptk.plan.cost` is the cost
model (parameters, FLOPs, activations) it shares with stage balancing (:mod:`mptk.plan.partition`)
and FLOP/s logging; :mod:`mptk.plan.search` ranks layouts; :func:`predict_fits` is the hook the
training preflight calls. Pure arithmetic, no GPU: torch is imported only by
:func:`predict_fits`, to look at the visible GPU when the config names none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from mptk.config.checks import sequence_parallel
from mptk.config.schema import ClusterConfig, RunConfig
from mptk.parallel.layout import Layout
from mptk.plan import partition
from mptk.plan.cost import MoEShape, Shape, active_params, shape_of, total_params
from mptk.plan.hardware import EFFICIENCY, GPU, Cluster, GiB, from_device_name, gpu
from mptk.plan.memory import Choice, Memory, Training, training_of, worst_memory
from mptk.plan.perf import Timing, estimate

__all__ = ["Choice", "Cluster", "GPU", "Plan", "choice_of", "gpu", "make_plan",
           "plan", "predict_fits", "RESERVE", "stage_counts"]

RESERVE = 2 * GiB
"""Per-GPU memory the planner keeps back: CUDA context (~0.5 GiB), NCCL buffers, allocator
fragmentation. An assumption; ``--reserve-gib`` changes it."""


# --------------------------------------------------------------------------- config


def choice_of(cfg: RunConfig, world: int) -> Choice:
    """The layout a config asks for on ``world`` GPUs (``train.recompute`` and ``parallel.sp``
    included; ``train.recompute_method`` / ``recompute_layers`` are in :class:`Training`)."""
    p, recompute = cfg.parallel, cfg.train.recompute
    return Choice(tp=p.tp, pp=p.pp, dp=max(1, world // (p.tp * p.cp * p.pp)), vpp=p.vpp or 1,
                  zero=cfg.zero.stage, micro=cfg.train.micro_batch_size,
                  recompute=str(getattr(recompute, "value", recompute)),
                  sp=bool(sequence_parallel(p, cfg.model)), cp=p.cp, ep=p.ep)


def stage_counts(cfg: RunConfig, c: Choice) -> list[int]:
    """Layers per virtual stage as training will split them (:mod:`mptk.plan.partition`
    with ``parallel.layers_per_stage``); an invalid list, which the preflight reports,
    falls back to an even split so the plan still prints."""
    if c.pp == 1:
        return [cfg.model.num_layers]
    try:
        return list(partition.stage_layers(cfg.model, c.pp, c.vpp, cfg.parallel.layers_per_stage))
    except partition.PartitionError:
        return partition.even_split(cfg.model.num_layers, c.pp * c.vpp)


# --------------------------------------------------------------------------- plan


@dataclass(slots=True)
class Plan:
    """One layout on one cluster: memory of the worst pipeline rank, step time, verdict."""

    shape: Shape
    choice: Choice
    training: Training
    cluster: Cluster
    memory: Memory
    timing: Timing

    @property
    def fits(self) -> bool:
        """The worst rank's total fits in the card's memory."""
        return self.memory.total() <= self.cluster.gpu.memory

    def verdict(self) -> str:
        """One line: fits with the room left, or does not with the two largest items."""
        need, have = self.memory.total() / GiB, self.cluster.gpu.memory / GiB
        where = f"on {self.cluster.gpu.name} (pipeline rank {self.memory.rank})"
        if self.fits:
            return self.params_line() + (f"fits: {need:.1f} GiB of {have:.1f} GiB per GPU {where}, "
                                         f"{have - need:.1f} GiB free")
        top = sorted(self.memory.rows(), key=lambda r: -r[1])[:2]
        largest = ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in top)
        return self.params_line() + (
            f"does not fit: needs {need:.1f} GiB of {have:.1f} GiB per GPU {where}; largest: "
            f"{largest}; try a higher ZeRO stage, more tp/pp, a smaller micro-batch, or --search")

    def params_line(self) -> str:
        """A MoE model's ``parameters: X total, Y active; `` (empty for a dense model, whose
        parameters are all active)."""
        if not isinstance(self.shape, MoEShape):
            return ""
        return (f"parameters: {total_params(self.shape):,} total, {active_params(self.shape):,} "
                f"active (ep {self.choice.ep}, {self.memory.params:,} on this rank); ")


def make_plan(sh: Shape, c: Choice, tr: Training, cluster: Cluster, counts: list[int],
              efficiency: float = EFFICIENCY, reserve: float = RESERVE,
              every_rank: bool = True) -> Plan:
    """Assemble memory and time for layout ``c``."""
    memory = worst_memory(sh, c, tr, counts, reserve, every_rank)
    return Plan(sh, c, tr, cluster, memory, estimate(sh, c, tr, cluster, counts, efficiency))


def plan(cfg: RunConfig, cluster: Cluster, choice: Optional[Choice] = None,
         efficiency: float = EFFICIENCY, reserve: float = RESERVE) -> Plan:
    """The plan of ``cfg``'s layout (or ``choice``) on ``cluster``."""
    c = choice or choice_of(cfg, cluster.world)
    return make_plan(shape_of(cfg.model), c, training_of(cfg), cluster, stage_counts(cfg, c),
                     efficiency, reserve)


# --------------------------------------------------------------------------- preflight hook


ClusterLike = Union[ClusterConfig, Cluster, None]
"""A run's cluster profile, a planner :class:`Cluster`, or nothing (local runs)."""


def _gpu_run(cfg: RunConfig, cluster: ClusterLike) -> bool:
    """Whether the run is on GPUs: train.device, else the cluster profile, else CUDA."""
    device = cfg.train.device.value
    if device != "auto":
        return device == "cuda"
    if cluster is not None and cluster.gpus_per_node:
        return True
    # device=auto on a machine without a profile: what training will pick (lazy: the planner's
    # arithmetic never needs torch)
    import torch

    return torch.cuda.is_available()


def _local_gpu() -> Optional[GPU]:
    """The visible GPU's table entry with its real memory, if there is one."""
    import torch

    if not torch.cuda.is_available():
        return None
    found = from_device_name(torch.cuda.get_device_name(0))
    total = torch.cuda.get_device_properties(0).total_memory
    return dataclasses.replace(found, memory=total) if found else None


def hardware_for(cluster: ClusterLike, world: int) -> Optional[Cluster]:
    """A planner :class:`Cluster` from a cluster profile (its ``gpu`` name) or a visible GPU;
    None when the GPU type is unknown."""
    if isinstance(cluster, Cluster):
        return cluster
    name = getattr(cluster, "gpu", None)  # None, or a profile-like object without the field
    card = gpu(name) if name else _local_gpu()
    if card is None:
        return None
    per_node = (cluster.gpus_per_node if cluster is not None else 0) or world
    return Cluster(nodes=max(1, world // per_node), gpus_per_node=min(per_node, world), gpu=card)


def predict_fits(cfg: RunConfig, layout: Layout, cluster: ClusterLike = None) -> tuple[bool, str]:
    """``(fits, reason)`` for the training preflight. CPU runs, and GPU runs whose GPU type is
    unknown (no ``cluster.gpu``, no visible GPU), are not checked and count as fitting."""
    if not _gpu_run(cfg, cluster):
        return True, "CPU run: GPU memory not planned"
    try:
        hw = hardware_for(cluster, layout.world)
    except KeyError as err:
        return True, f"{err.args[0]}: memory not checked"
    if hw is None:
        return True, "GPU type unknown (set cluster.gpu or run on the GPU): memory not checked"
    try:
        return _layout_fits(cfg, layout, hw)
    except Exception as err:  # a planner gap must not block a run the preflight accepted
        return True, f"memory not checked ({type(err).__name__}: {err})"


def _layout_fits(cfg: RunConfig, layout: Layout, hw: Cluster) -> tuple[bool, str]:
    """The preflight's layout (its stage split when it has one) planned on ``hw``."""
    c = dataclasses.replace(choice_of(cfg, layout.world), tp=layout.tp, pp=layout.pp,
                            dp=layout.dp, vpp=layout.vpp or 1)
    counts = list(layout.stage_layers) or stage_counts(cfg, c)
    p = make_plan(shape_of(cfg.model), c, training_of(cfg), hw, counts)
    return p.fits, p.verdict()
