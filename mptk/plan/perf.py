"""Step time: model FLOPs (Megatron's formula, from :mod:`mptk.plan.cost`) over an achievable
per-GPU rate, tensor-parallel all-reduces and data-parallel reductions over NVLink/InfiniBand,
the pipeline bubble, the optimizer step; then tokens/s and MFU.

Assumptions (each a constant below): compute and tp communication are not overlapped
(megatron's tp collectives sit on the critical path); DeepSpeed's dp reduction is exposed
unless ``zero.overlap_comm``, then half of the compute hides it; ring collectives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mptk.plan.cost import (
    Shape,
    cp_alltoall_bytes,
    ep_alltoall_bytes,
    hardware_flops,
    local_sequence,
    model_flops,
    numel,
    recomputed_layers,
    stage_tensors,
)
from mptk.plan.hardware import LOCAL_ATTENTION, Cluster
from mptk.plan.memory import Choice, Training, rank_layers

LATENCY_NVLINK = 10e-6
"""Seconds per collective inside a node (NCCL small-message latency, order of magnitude)."""
LATENCY_IB = 25e-6
"""Seconds per collective across nodes."""
ZERO3_SLOWDOWN = 316 / 132
"""ZeRO-3's partition/gather hooks on one H200 (STACK_NOTES: 132 vs 316 TF/s at ZeRO-1)."""
OPTIMIZER_PASSES = 2.0
"""Memory passes of torch's foreach AdamW over its tensors (memory-bound step)."""


# --------------------------------------------------------------------------- pipeline


def bubble_fraction(p: int, m: int) -> float:
    """Share of a 1F1B step spent idle: (p-1)/(m+p-1) (Narayanan et al. 2021)."""
    return (p - 1) / (m + p - 1)


def bubble_overhead(p: int, m: int, v: int = 1) -> float:
    """Bubble time relative to the ideal compute time: (p-1)/(v m); v model chunks per rank
    (the interleaved schedule) divide it by v."""
    return (p - 1) / (v * m)


# --------------------------------------------------------------------------- communication


def ring_bytes(size: float, n: int, op: str) -> float:
    """Bytes each GPU sends in a ring collective over ``n`` ranks."""
    if n <= 1:
        return 0.0
    return size * (2 if op == "all_reduce" else 1) * (n - 1) / n


def link(cluster: Cluster, span: int) -> tuple[float, float]:
    """(bandwidth, latency) of a group spanning ``span`` consecutive ranks."""
    if span <= cluster.gpus_per_node:
        return cluster.gpu.nvlink, LATENCY_NVLINK
    return cluster.gpu.ib, LATENCY_IB


def tp_comm(sh: Shape, c: Choice, tr: Training, cluster: Cluster, layers: int, m: int,
            recomputed: int = 0) -> float:
    """Seconds of tensor-parallel all-reduces per step on one GPU: 2 forward + 2 backward per
    layer and micro-batch (+2 per ``recomputed`` layer: its forward reruns); sequence parallel
    swaps each for a reduce-scatter + all-gather of the same volume."""
    if c.tp <= 1:
        return 0.0
    count = (4 * layers + 2 * recomputed) * m
    bw, lat = link(cluster, c.tp)
    size = c.micro * sh.seq * sh.hidden * tr.w
    return count * (lat + ring_bytes(size, c.tp, "all_reduce") / bw)


def dp_comm(c: Choice, tr: Training, cluster: Cluster, params: int, m: int) -> float:
    """Seconds of data-parallel traffic per step: ZeRO-0/1 one gradient all-reduce; ZeRO-2 a
    reduce-scatter per micro-batch and a parameter all-gather; ZeRO-3 per micro-batch two
    parameter all-gathers (forward, backward) and a reduce-scatter."""
    if c.dp <= 1:
        return 0.0
    bw, lat = link(cluster, c.tp * c.dp)
    size = params * tr.w
    half = ring_bytes(size, c.dp, "reduce_scatter")
    volume = {0: 2 * half, 1: 2 * half, 2: (m + 1) * half, 3: 3 * m * half}[c.zero]
    buckets = max(1, size // (tr.reduce_bucket * tr.w))
    return volume / bw + lat * buckets * (m if c.zero >= 2 else 1)


def pp_comm(sh: Shape, c: Choice, tr: Training, cluster: Cluster, m: int) -> float:
    """Seconds of pipeline sends per step: activation forward and gradient back, per
    micro-batch and model chunk (sequence parallel sends a 1/tp slice)."""
    if c.pp <= 1:
        return 0.0
    bw, lat = link(cluster, c.tp * c.dp * c.pp)
    size = c.micro * sh.seq * sh.hidden * tr.w / (c.tp if c.sp else 1)
    return 2 * m * c.vpp * (lat + size / bw)


def cp_comm(sh: Shape, c: Choice, tr: Training, cluster: Cluster, layers: int, m: int,
            recomputed: int = 0) -> float:
    """Seconds of Ulysses all-to-alls per step on one GPU: 4 each way per layer and
    micro-batch (+ the forward's 4 again per ``recomputed`` layer). The cp group spans tp
    ranks times cp (megatron's order tp-cp-dp-pp)."""
    if c.cp <= 1:
        return 0.0
    bw, lat = link(cluster, c.tp * c.cp)
    size = cp_alltoall_bytes(sh, c.micro, c.tp, c.cp, tr.w)
    return (layers + recomputed / 2) * m * (size / bw + 8 * lat)


def ep_comm(sh: Shape, c: Choice, tr: Training, cluster: Cluster, layers: int, m: int,
            recomputed: int = 0) -> float:
    """Seconds of the MoE token dispatcher's all-to-alls per step on one GPU: dispatch and
    combine each way per layer and micro-batch (+ the forward's two again per ``recomputed``
    layer). The ep group spans tp ranks times ep (megatron's expert order tp-ep-dp)."""
    if c.ep <= 1:
        return 0.0
    bw, lat = link(cluster, c.tp * c.ep)
    size = ep_alltoall_bytes(sh, c.micro, c.tp, c.sp, c.ep, tr.w)
    return (layers + recomputed / 2) * m * (size / bw + 4 * lat)


def optimizer_time(params: int, c: Choice, tr: Training, cluster: Cluster) -> float:
    """Memory-bound AdamW over this rank's partition: grad, master, 2 moments read, master,
    moments and the working copy written."""
    elements = params / (c.dp if c.zero >= 1 else 1)
    return OPTIMIZER_PASSES * elements * (28 + tr.w) / cluster.gpu.hbm


# --------------------------------------------------------------------------- step


@dataclass(slots=True)
class Timing:
    """Seconds per step by part, then throughput."""

    compute: float
    tp: float
    bubble: float
    pp: float
    dp: float
    optimizer: float
    step: float
    samples_per_s: float
    tokens_per_s: float
    mfu: float
    bubble_share: float
    cp: float = 0.0
    """Context-parallel all-to-alls (part of ``step``)."""
    ep: float = 0.0
    """Expert-parallel (MoE token dispatcher) all-to-alls (part of ``step``)."""

    def rows(self) -> list[tuple[str, float]]:
        """(part, seconds) in the order the report prints them."""
        rows = [("compute", self.compute), ("tensor-parallel all-reduce", self.tp),
                ("pipeline bubble", self.bubble), ("pipeline sends", self.pp),
                ("data-parallel reduce (exposed)", self.dp), ("optimizer step", self.optimizer)]
        rows += [("context-parallel all-to-all", self.cp)] if self.cp else []
        return rows + ([("expert-parallel all-to-all", self.ep)] if self.ep else [])


def rate(sh: Shape, c: Choice, cluster: Cluster, efficiency: float) -> float:
    """Achievable FLOP/s of one GPU for this model and stage."""
    eff = efficiency * (1.0 if sh.flash else LOCAL_ATTENTION)
    return cluster.gpu.tflops * 1e12 * eff / (ZERO3_SLOWDOWN if c.zero == 3 else 1.0)


def estimate(sh: Shape, c: Choice, tr: Training, cluster: Cluster, counts: list[int],
             efficiency: float) -> Timing:
    """Step time and throughput of layout ``c`` (``counts``: layers per virtual stage)."""
    m, world = c.grad_acc(tr.global_batch), cluster.world
    worst = max(range(c.pp), key=lambda r: rank_layers(counts, c.pp, r))
    layers = rank_layers(counts, c.pp, worst)
    imbalance = layers * c.pp / sh.layers
    recomputed = sum(recomputed_layers(n, c.recompute, tr.recompute_method, tr.recompute_layers)
                     for n in counts[worst::c.pp])
    share = recomputed / layers if layers else 1.0
    compute = hardware_flops(sh, tr.global_batch, c.recompute, share) / world * imbalance / rate(
        sh, c, cluster, efficiency)
    local = local_sequence(sh, c.cp)  # a cp rank's tp and pp traffic is on seq/cp tokens
    tp = tp_comm(local, c, tr, cluster, layers, m, recomputed)
    cp = cp_comm(sh, c, tr, cluster, layers, m, recomputed)
    ep = ep_comm(local, c, tr, cluster, layers, m, recomputed)
    bubble = (compute + tp + cp + ep) * bubble_overhead(c.pp, m, c.vpp)
    dp, optimizer = _reductions(sh, c, tr, cluster, layers, m)
    hidden = 0.5 * compute if tr.overlap_comm and c.zero >= 1 else 0.0
    parts = (compute, tp, bubble, pp_comm(local, c, tr, cluster, m), max(0.0, dp - hidden), optimizer)
    step = sum(parts) + cp + ep
    peak = world * cluster.gpu.tflops * 1e12
    return Timing(*parts, step=step, samples_per_s=tr.global_batch / step,
                  tokens_per_s=tr.global_batch * sh.seq / step,
                  mfu=model_flops(sh, tr.global_batch) / step / peak,
                  bubble_share=bubble / step, cp=cp, ep=ep)


def _reductions(sh: Shape, c: Choice, tr: Training, cluster: Cluster, layers: int,
                m: int) -> tuple[float, float]:
    """(data-parallel reduce, optimizer step) seconds: dense gradients reduce over dp x cp,
    a MoE rank's experts over the expert-data-parallel group (dp x cp / ep)."""
    last = c.pp == 1
    dense = numel(stage_tensors(sh, c.tp, layers, True, last, c.pp, part="dense"))
    experts = numel(stage_tensors(sh, c.tp, layers, True, last, c.pp, c.ep, part="experts"))
    replicas = dataclasses.replace(c, dp=c.replicas, cp=1)  # gradients reduce over dp x cp
    owners = dataclasses.replace(c, dp=c.expert_replicas, cp=1)
    dp = dp_comm(replicas, tr, cluster, dense, m) + (dp_comm(owners, tr, cluster, experts, m) if experts else 0.0)
    optimizer = optimizer_time(dense, replicas, tr, cluster) + optimizer_time(experts, owners, tr, cluster)
    return dp, optimizer
