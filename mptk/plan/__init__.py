"""mptk-plan: memory and step time of a training layout before any GPU is touched.

``plan(cfg, cluster)`` gives a :class:`Plan` (memory per GPU by item, step time by part,
tokens/s, MFU, a verdict); :mod:`mptk.plan.search` ranks layouts; :func:`predict_fits` is the
hook the training preflight calls. Pure arithmetic: no torch import, no GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from mptk.plan.hardware import EFFICIENCY, GPU, Cluster, GiB, from_device_name, gpu
from mptk.plan.memory import (Choice, Memory, Shape, Training, even_split, shape_of,
                              training_of, worst_memory)
from mptk.plan.perf import Timing, estimate

__all__ = ["Choice", "Cluster", "GPU", "Plan", "choice_of", "gpu", "make_plan", "plan",
           "predict_fits", "RESERVE"]

RESERVE = 2 * GiB
"""Per-GPU memory the planner keeps back: CUDA context (~0.5 GiB), NCCL buffers, allocator
fragmentation. An assumption; ``--reserve-gib`` changes it."""

KNOBS: dict[str, tuple[str, ...]] = {
    "vpp": ("parallel.vpp",),
    "recompute": ("model.recompute", "train.recompute", "parallel.recompute",
                  "model.recompute_granularity"),
    "sp": ("parallel.sequence_parallel", "model.sequence_parallel", "parallel.sp"),
}
"""Config paths that may carry a planner knob; the first one the schema has is used."""


# --------------------------------------------------------------------------- config


def config_path(cfg: Any, knob: str) -> Optional[str]:
    """The config key that sets ``knob`` in this schema, or None when it has none."""
    for path in KNOBS[knob]:
        group, _, name = path.partition(".")
        node = getattr(cfg, group, None)
        if node is not None and name in {f.name for f in dataclasses.fields(node)}:
            return path
    return None


def read_knob(cfg: Any, path: Optional[str]) -> Any:
    if path is None:
        return None
    group, _, name = path.partition(".")
    return getattr(getattr(cfg, group), name)


def _recompute(value: Any) -> str:
    value = getattr(value, "value", value)
    if value in (None, False, "none", "null", ""):
        return "none"
    return "full" if value is True else str(value)


def choice_of(cfg: Any, world: int) -> Choice:
    """The layout a config asks for on ``world`` GPUs."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    return Choice(tp=tp, pp=pp, dp=max(1, world // (tp * pp)),
                  vpp=read_knob(cfg, config_path(cfg, "vpp")) or 1, zero=cfg.zero.stage,
                  micro=cfg.train.micro_batch_size,
                  recompute=_recompute(read_knob(cfg, config_path(cfg, "recompute"))),
                  sp=bool(read_knob(cfg, config_path(cfg, "sp"))))


def stage_counts(cfg: Any, c: Choice) -> list[int]:
    """Layers per virtual stage as training will split them (megatron partition of the
    lead's :mod:`mptk.models.partition` when importable, else an even split)."""
    layers = cfg.model.num_layers
    if c.pp == 1:
        return [layers]
    try:
        from mptk.models import partition

        spec = getattr(cfg.parallel, "layers_per_stage", "auto")
        return list(partition.stage_layers(cfg.model, c.pp, c.vpp, spec))
    except Exception:  # an invalid list (preflight reports it) or no partition module
        return even_split(layers, c.pp * c.vpp)


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
        return self.memory.total() <= self.cluster.gpu.memory

    def verdict(self) -> str:
        need, have = self.memory.total() / GiB, self.cluster.gpu.memory / GiB
        where = f"on {self.cluster.gpu.name} (pipeline rank {self.memory.rank})"
        if self.fits:
            return f"fits: {need:.1f} GiB of {have:.1f} GiB per GPU {where}, {have - need:.1f} GiB free"
        top = sorted(self.memory.rows(), key=lambda r: -r[1])[:2]
        largest = ", ".join(f"{name} {value / GiB:.1f} GiB" for name, value in top)
        return (f"does not fit: needs {need:.1f} GiB of {have:.1f} GiB per GPU {where}; largest: "
                f"{largest}; try a higher ZeRO stage, more tp/pp, a smaller micro-batch, or --search")


def make_plan(sh: Shape, c: Choice, tr: Training, cluster: Cluster, counts: list[int],
              efficiency: float = EFFICIENCY, reserve: float = RESERVE,
              every_rank: bool = True) -> Plan:
    """Assemble memory and time for layout ``c``."""
    memory = worst_memory(sh, c, tr, counts, reserve, every_rank)
    return Plan(sh, c, tr, cluster, memory, estimate(sh, c, tr, cluster, counts, efficiency))


def plan(cfg: Any, cluster: Cluster, choice: Optional[Choice] = None,
         efficiency: float = EFFICIENCY, reserve: float = RESERVE) -> Plan:
    """The plan of ``cfg``'s layout (or ``choice``) on ``cluster``."""
    c = choice or choice_of(cfg, cluster.world)
    return make_plan(shape_of(cfg.model), c, training_of(cfg), cluster, stage_counts(cfg, c),
                     efficiency, reserve)


# --------------------------------------------------------------------------- preflight hook


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _gpu_run(cfg: Any, cluster: Any) -> bool:
    """Whether the run is on GPUs: train.device, else the cluster profile, else CUDA."""
    device = _value(cfg.train.device)
    if device != "auto":
        return device == "cuda"
    if getattr(cluster, "gpus_per_node", 0):
        return True
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


def hardware_for(cluster: Any, world: int) -> Optional[Cluster]:
    """A planner :class:`Cluster` from a cluster profile (``ClusterConfig``-like, with an
    optional ``gpu`` name) or a visible GPU; None when the GPU type is unknown."""
    if isinstance(cluster, Cluster):
        return cluster
    name = getattr(cluster, "gpu", None)
    card = gpu(name) if name else _local_gpu()
    if card is None:
        return None
    per_node = getattr(cluster, "gpus_per_node", 0) or world
    return Cluster(nodes=max(1, world // per_node), gpus_per_node=min(per_node, world), gpu=card)


def predict_fits(cfg: Any, layout: Any, cluster: Any = None) -> tuple[bool, str]:
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


def _layout_fits(cfg: Any, layout: Any, hw: Cluster) -> tuple[bool, str]:
    c = dataclasses.replace(choice_of(cfg, layout.world), tp=layout.tp, pp=layout.pp,
                            dp=layout.dp, vpp=getattr(layout, "vpp", 1) or 1)
    counts = list(getattr(layout, "stage_layers", ()) or ()) or stage_counts(cfg, c)
    p = make_plan(shape_of(cfg.model), c, training_of(cfg), hw, counts)
    return p.fits, p.verdict()
