"""Memory per GPU: DeepSpeed's model states per ZeRO stage, the activations a pipeline rank
holds and temporary buffers (parameters and per-layer bytes: :mod:`mptk.plan.cost`).

Model states follow DeepSpeed 0.19.8 as measured on its engine (see :mod:`mptk.launch.measure`):
working-precision parameters ``w`` bytes each (2 for bf16/fp16, 4 for fp32), gradients in
the same dtype, and for ZeRO >= 1 (or any 16-bit run) an fp32 master copy plus the torch
optimizer's states (AdamW: exp_avg + exp_avg_sq, 8 bytes, and a 4-byte ``step`` scalar per
optimized tensor; SGD: a 4-byte momentum buffer). Mixed precision is thus 2+2+12 = 16 bytes
per parameter, fp32 at ZeRO-0 4+4+8; fp32 at ZeRO >= 1 keeps a master copy too (DeepSpeed
clones the partition), 4+4+12/N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from mptk.config.schema import RunConfig
from mptk.plan.cost import (
    Shape,
    Tensors,
    head_bytes,
    largest_layer,
    local_sequence,
    numel,
    param_groups,
    recompute_transient,
    stage_activations,
    stage_tensors,
    tensor_count,
)

__all__ = ["Choice", "Memory", "States", "Training", "buffers", "in_flight", "interleave_factor",
           "model_states", "rank_activations", "rank_layers", "rank_memory", "rank_states", "training_of",
           "worst_memory", "zero_paper"]


# --------------------------------------------------------------------------- model states


@dataclass(frozen=True, slots=True)
class Training:
    """Run settings that change memory and time (from ``cfg.train``/``zero``/``optim``)."""

    w: int = 2
    """Bytes per working-precision element (2 bf16/fp16, 4 fp32)."""
    optimizer: str = "adamw"
    global_batch: int = 1
    reduce_bucket: int = 50_000_000
    overlap_comm: bool = False
    persistence: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    sub_group: int = 1_000_000_000
    """ZeRO-3 ``sub_group_size`` (DeepSpeed default)."""
    recompute_method: str = "uniform"
    """``train.recompute_method`` (which layers ``recompute=full`` recomputes)."""
    recompute_layers: int = 1
    """``train.recompute_layers``: group size (uniform) or layers per model chunk (block)."""
    mask: float = 1.0
    """Bytes per dropout-mask element kept for backward: 1 on a GPU (a bool mask); on the CPU
    torch keeps the scaled noise in the activation dtype (``w``)."""


def training_of(cfg: RunConfig) -> Training:
    """The :class:`Training` settings of a run config."""
    z, value = cfg.zero, lambda e: getattr(e, "value", e)
    extra = z.extra.get("zero_optimization", {}) if isinstance(z.extra, dict) else {}
    return Training(
        w=4 if value(cfg.train.dtype) == "fp32" else 2, optimizer=cast(str, value(cfg.optim.name)),
        global_batch=cfg.train.global_batch_size, reduce_bucket=int(z.reduce_bucket_size),
        overlap_comm=bool(z.overlap_comm), persistence=int(z.stage3_param_persistence_threshold),
        offload_optimizer=bool(z.offload_optimizer), offload_params=bool(z.offload_params),
        sub_group=int(extra.get("sub_group_size", 1_000_000_000)),
        recompute_method=cast(str, value(cfg.train.recompute_method)),
        recompute_layers=int(cfg.train.recompute_layers))


@dataclass(slots=True)
class States:
    """Model-state bytes on one rank, by role."""

    params: float = 0.0
    grads: float = 0.0
    master: float = 0.0
    optim: float = 0.0

    def total(self) -> float:
        """All model-state bytes."""
        return self.params + self.grads + self.master + self.optim

    def as_dict(self) -> dict[str, float]:
        """By role, with the total (what ``--measure`` compares)."""
        return {"params": self.params, "grads": self.grads, "master": self.master,
                "optim": self.optim, "total": self.total()}


def _aligned(group: int, dp: int) -> int:
    """DeepSpeed ZeRO-1/2 pads each flat group to a multiple of 2 * dp elements."""
    unit = 2 * dp
    return -(-group // unit) * unit


def _moments(elements: float, tensors: int, optimizer: str) -> float:
    """torch optimizer state: AdamW 2 fp32 moments + a 4-byte step per tensor; SGD momentum."""
    if optimizer == "sgd":
        return 4 * elements
    return 8 * elements + 4 * tensors


def stage0(t: Tensors, tr: Training) -> States:
    """No partitioning: every rank holds everything (DeepSpeed keeps an fp32 master only
    for 16-bit runs)."""
    n = numel(t)
    master = 0 if tr.w == 4 else 4 * n
    return States(params=tr.w * n, grads=tr.w * n, master=master,
                  optim=_moments(n, tensor_count(t), tr.optimizer))


def stage12(t: Tensors, dp: int, stage: int, tr: Training) -> States:
    """ZeRO-1/2: flat padded parameter groups; fp32 master and states partitioned; gradients
    full at ZeRO-1 (held until the boundary's reduction), partitioned at ZeRO-2 (16-bit runs
    also up-cast each group's partition at the step: a buffer, :func:`buffers`)."""
    groups = param_groups(t)
    part = sum(_aligned(g, dp) // dp for g in groups)
    grads = tr.w * (numel(t) if stage == 1 else part)
    return States(params=tr.w * sum(_aligned(g, dp) for g in groups), grads=grads,
                  master=4 * part, optim=_moments(part, len(groups), tr.optimizer))


def stage3(t: Tensors, dp: int, tr: Training) -> States:
    """ZeRO-3: parameters, gradients, master and states all partitioned per tensor
    (``ceil(numel / dp)`` each); tensors under the persistence threshold stay whole."""
    part = sum(-(-n // dp) * c for (n, _), c in t.items())
    whole = sum(n * c for (n, _), c in t.items() if n < tr.persistence)
    groups = [sum(-(-n // dp) * c for (n, m), c in t.items() if m == flag) for flag in (True, False)]
    subgroups = sum(-(-g // tr.sub_group) for g in groups if g)
    return States(params=tr.w * (part + whole), grads=tr.w * part, master=4 * part,
                  optim=_moments(part, subgroups, tr.optimizer))


def model_states(t: Tensors, dp: int, stage: int, tr: Training) -> States:
    """Bytes of parameters, gradients, fp32 master and optimizer states on one rank."""
    if stage == 0:
        s = stage0(t, tr)
    elif stage in (1, 2):
        s = stage12(t, dp, stage, tr)
    else:
        s = stage3(t, dp, tr)
    return _offloaded(s, stage, tr)


def _offloaded(s: States, stage: int, tr: Training) -> States:
    """Offload moves the fp32 master and states (and at ZeRO-3 the parameters) to the CPU."""
    if tr.offload_optimizer:
        s.master, s.optim = 0.0, 0.0
    if tr.offload_params and stage == 3:
        s.params = 0.0
    return s


def zero_paper(psi: float, dp: int, stage: int, k: int = 12, w: int = 2) -> float:
    """The ZeRO paper's (Rajbhandari et al. 2020, Fig. 1) model-state bytes per GPU."""
    params, grads, optim = w * psi, w * psi, k * psi
    if stage >= 1:
        optim /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        params /= dp
    return params + grads + optim


# --------------------------------------------------------------------------- activations held


def in_flight(pp: int, micro_batches: int, rank: int = 0) -> int:
    """Micro-batches whose activations a stage holds under 1F1B: pp - rank (first: pp)."""
    return max(1, min(pp - rank, micro_batches))


def interleave_factor(pp: int, vpp: int) -> float:
    """Korthikanti: with v model chunks per rank the first stage holds 1 + (p-1)/(p v) times
    the non-interleaved activations."""
    return 1.0 if vpp <= 1 or pp <= 1 else 1 + (pp - 1) / (pp * vpp)


# --------------------------------------------------------------------------- buffers


def buffers(stage: int, tr: Training, stage_params: int, largest_layer: int, dp: int = 1) -> float:
    """DeepSpeed's temporaries: ZeRO-0 flattens gradients for its all-reduce (bounded by the
    bucket); ZeRO-1/2 gradient bucket(s) of ``reduce_bucket_size`` elements (two with
    overlap_comm); ZeRO-3 a reduce bucket plus an all-gathered layer and the next one
    (prefetch). 16-bit runs at ZeRO-2/3 add the fp32 copy of the gradient partition made at
    the step (one group at a time; bounded here by the whole partition)."""
    if stage == 0:
        return tr.w * min(tr.reduce_bucket, stage_params) if dp > 1 else 0.0
    if stage == 1:
        return tr.w * tr.reduce_bucket * (2 if tr.overlap_comm else 1)
    upcast = 4 * stage_params / dp if tr.w < 4 else 0.0
    if stage == 2:
        return tr.w * tr.reduce_bucket * (2 if tr.overlap_comm else 1) + upcast
    return tr.w * (tr.reduce_bucket + 2 * largest_layer) + upcast


# --------------------------------------------------------------------------- breakdown


@dataclass(slots=True)
class Memory:
    """One rank's memory, bytes, by item."""

    states: States
    activations: float
    head: float
    buffers: float
    reserve: float
    rank: int = 0
    """Pipeline rank this breakdown is for (the worst one)."""
    params: int = 0
    """Parameters this rank holds (before ZeRO partitioning)."""
    layers: int = 0
    """Transformer layers on this rank."""
    micro_batches: float = 1.0
    """Micro-batches of activations held at once (in flight x interleaving factor)."""

    def total(self) -> float:
        """Everything the rank needs, reserve included."""
        return self.states.total() + self.activations + self.head + self.buffers + self.reserve

    def rows(self) -> list[tuple[str, float]]:
        """(item, bytes) in the order the report prints them."""
        st = self.states
        return [("weights", st.params), ("gradients", st.grads), ("fp32 master", st.master),
                ("optimizer states", st.optim), ("activations", self.activations),
                ("logits + loss", self.head), ("DeepSpeed buffers", self.buffers),
                ("CUDA context / NCCL / fragmentation", self.reserve)]


def rank_layers(counts: list[int], pp: int, rank: int) -> int:
    """Layers a pipeline rank holds: virtual stages rank, rank+pp, ... (interleaved order)."""
    return sum(counts[rank::pp])


@dataclass(frozen=True, slots=True)
class Choice:
    """One layout: the knobs the planner sets (``dp`` is world / (tp * cp * pp))."""

    tp: int
    pp: int
    dp: int
    vpp: int = 1
    zero: int = 0
    micro: int = 1
    recompute: str = "none"
    """``none``, ``selective`` or ``full`` activation recomputation."""
    sp: bool = False
    """Megatron sequence parallelism (tp > 1)."""
    cp: int = 1
    """Context parallelism: each rank holds seq/cp tokens of every sequence (Ulysses)."""
    ep: int = 1
    """Expert parallelism: each rank holds 1/ep of every MoE layer's experts (ep divides dp x cp)."""

    @property
    def replicas(self) -> int:
        """DeepSpeed's data-parallel world: dp x cp (gradients averaged, ZeRO partitions)."""
        return self.dp * self.cp

    @property
    def expert_replicas(self) -> int:
        """The expert-data-parallel group: ranks holding the same experts, dp x cp / ep (their
        gradients reduced and, under ZeRO, their optimizer states partitioned over it)."""
        return max(1, self.replicas // self.ep)

    def grad_acc(self, global_batch: int) -> int:
        """Micro-batches per step on each data-parallel rank."""
        return max(1, global_batch // (self.micro * self.dp))


def rank_activations(sh: Shape, c: Choice, tr: Training, chunks: list[int], held: float) -> float:
    """Activation bytes of a pipeline rank holding model chunks of ``chunks`` layers: each
    chunk's kept bytes per micro-batch (recompute applies per chunk, as megatron's
    ``recompute_method`` per transformer block) x the ``held`` micro-batches, plus what full
    recompute rebuilds for the one micro-batch in backward (largest chunk)."""
    args = (local_sequence(sh, c.cp), c.micro, c.tp, c.sp, c.recompute, tr.w)
    how = (tr.recompute_method, tr.recompute_layers)
    kept = sum(stage_activations(*args, n, *how, mask=tr.mask) for n in chunks)
    rebuilt = (recompute_transient(*args, n, *how, mask=tr.mask) for n in chunks)
    return kept * held + max(rebuilt, default=0.0)


def rank_states(sh: Shape, c: Choice, tr: Training, layers: int, first: bool, last: bool) -> States:
    """Model states of one rank: the dense tensors partitioned over dp x cp, the rank's experts
    (1/ep of them, DeepSpeed's separate ``moe`` groups) over the expert-data-parallel group."""
    dense = model_states(stage_tensors(sh, c.tp, layers, first, last, c.pp, part="dense"),
                         c.replicas, c.zero, tr)
    experts = stage_tensors(sh, c.tp, layers, first, last, c.pp, c.ep, part="experts")
    if not experts:
        return dense
    own = model_states(experts, c.expert_replicas, c.zero, tr)
    return States(params=dense.params + own.params, grads=dense.grads + own.grads,
                  master=dense.master + own.master, optim=dense.optim + own.optim)


def rank_memory(sh: Shape, c: Choice, tr: Training, counts: list[int], rank: int,
                reserve: float) -> Memory:
    """Memory of pipeline rank ``rank`` (``counts``: layers per virtual stage)."""
    first, last = rank == 0, rank == c.pp - 1
    layers = rank_layers(counts, c.pp, rank)
    t = stage_tensors(sh, c.tp, layers, first, last, c.pp, c.ep)
    experts = numel(stage_tensors(sh, c.tp, layers, first, last, c.pp, c.ep, part="experts"))
    # the fp32 up-cast buffer covers a 1/replicas partition: experts are split over ep fewer ranks
    partitioned = numel(t) + (c.ep - 1) * experts if c.zero else numel(t)
    held = in_flight(c.pp, c.grad_acc(tr.global_batch), rank) * interleave_factor(c.pp, c.vpp)
    return Memory(states=rank_states(sh, c, tr, layers, first, last),
                  activations=rank_activations(sh, c, tr, counts[rank::c.pp], held),
                  head=head_bytes(local_sequence(sh, c.cp), c.micro, c.tp, c.sp, tr.w) if last else 0.0,
                  buffers=buffers(c.zero, tr, partitioned, largest_layer(sh, c.tp, c.ep), c.replicas),
                  reserve=reserve, rank=rank, params=numel(t), layers=layers, micro_batches=held)


def worst_memory(sh: Shape, c: Choice, tr: Training, counts: list[int], reserve: float,
                 every_rank: bool = False) -> Memory:
    """The pipeline rank needing the most memory: all ranks, or (fast) the first two and
    the last (the first holds the most in-flight micro-batches, the last the output layer)."""
    ranks = range(c.pp) if every_rank else sorted({0, min(1, c.pp - 1), c.pp - 1})
    return max((rank_memory(sh, c, tr, counts, r, reserve) for r in ranks), key=Memory.total)
