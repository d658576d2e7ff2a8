"""GPU table: peak dense bf16 TFLOP/s, memory, HBM, NVLink and InfiniBand bandwidth.

Bandwidths are per GPU and per direction (what a ring collective's bus bandwidth is
bounded by). Memory is what ``nvidia-smi`` reports as total (MiB), a little under the
marketing figure. Sources are given per entry; figures marked *assumed* are typical
system builds (e.g. DGX: one 400 Gb/s NIC per GPU), not properties of the chip.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GiB = 2**30
MiB = 2**20


@dataclass(frozen=True, slots=True)
class GPU:
    """One accelerator type and its usual node fabric."""

    name: str
    tflops: float
    """Peak dense bf16 tensor-core TFLOP/s (no sparsity)."""
    memory: float
    """Device memory in bytes (nvidia-smi total)."""
    hbm: float
    """Memory bandwidth, bytes/s."""
    nvlink: float
    """Intra-node GPU-to-GPU bandwidth per direction, bytes/s."""
    ib: float
    """Inter-node bandwidth per GPU per direction, bytes/s."""
    efficiency: float = 0.34
    """Fraction of peak a transformer layer reaches (see :data:`EFFICIENCY`)."""


EFFICIENCY = 0.34
"""Achievable fraction of peak for mptk's path (SDPA attention, DeepSpeed with a torch AdamW
around a megatron-core GPT), from H200 measurements of that path (../shared/STACK_NOTES.md,
GPT 1.3B shape, bf16, micro-batch 4): DeepSpeed ZeRO-0 334 TF/s = 0.34 of 989; ZeRO-1 316
(0.32); ZeRO-1 with fused AdamW and overlap_comm 368 (0.37). One card, one shape: the GPU
check in docs/planner.md recalibrates it. Stock megatron local attention reached 212 TF/s
(see :data:`LOCAL_ATTENTION`)."""

LOCAL_ATTENTION = 212 / 396
"""Throughput ratio of megatron's stock attention to SDPA (STACK_NOTES: 212 vs 396 TF/s)."""

GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TF with sparsity -> 989 dense;
    # 80 GB HBM3 at 3.35 TB/s; NVLink 4 900 GB/s bidirectional. nvidia-smi: 81559 MiB.
    # IB assumed: DGX H100, 8x ConnectX-7 400 Gb/s = 50 GB/s per GPU.
    "h100": GPU("h100", 989.0, 81559 * MiB, 3.35e12, 450 * GB, 50 * GB),
    # H100 PCIe datasheet: BF16 1,513 TF sparse -> 756 dense; 80 GB HBM2e 2.0 TB/s;
    # no NVLink switch assumed: PCIe Gen5 x16 64 GB/s per direction; IB assumed 400 Gb/s.
    "h100_pcie": GPU("h100_pcie", 756.0, 81559 * MiB, 2.0e12, 64 * GB, 50 * GB),
    # NVIDIA H200 datasheet (SXM): same compute as H100 SXM (989 dense bf16); 141 GB HBM3e
    # at 4.8 TB/s; NVLink 900 GB/s bidirectional. nvidia-smi: 143771 MiB. IB as DGX H200.
    "h200": GPU("h200", 989.0, 143771 * MiB, 4.8e12, 450 * GB, 50 * GB),
    # NVIDIA A100 datasheet: BF16 312 TF dense; A100 80GB SXM 2,039 GB/s HBM2e; NVLink 3
    # 600 GB/s bidirectional. nvidia-smi: 81920 MiB. IB assumed DGX A100: 8x HDR 200 Gb/s.
    "a100": GPU("a100", 312.0, 81920 * MiB, 2.039e12, 300 * GB, 25 * GB),
    # A100 40GB SXM: 1,555 GB/s HBM2; nvidia-smi: 40960 MiB.
    "a100_40gb": GPU("a100_40gb", 312.0, 40960 * MiB, 1.555e12, 300 * GB, 25 * GB),
    # NVIDIA DGX B200 datasheet: 72 PF FP8 training / 8 GPUs with sparsity -> 2,250 TF dense
    # bf16 per GPU; 1,440 GB HBM3e total = 180 GB per GPU at 8 TB/s; NVLink 5 1.8 TB/s
    # bidirectional; 8x ConnectX-7 400 Gb/s. Memory as 180 GB (nvidia-smi not checked).
    "b200": GPU("b200", 2250.0, 180e9, 8.0e12, 900 * GB, 50 * GB),
    # NVIDIA L40S datasheet: BF16 733 TF sparse -> 362 dense; 48 GB GDDR6 at 864 GB/s;
    # PCIe Gen4 x16 32 GB/s per direction, no NVLink; 200 Gb/s Ethernet/IB assumed.
    "l40s": GPU("l40s", 362.0, 46068 * MiB, 0.864e12, 32 * GB, 25 * GB),
}

ALIASES = {"h100_sxm": "h100", "h100-sxm": "h100", "h200_sxm": "h200", "a100_80gb": "a100",
           "a100-80gb": "a100", "a100-40gb": "a100_40gb", "h100-pcie": "h100_pcie"}


def gpu(name: str) -> GPU:
    """The table entry for ``name`` (case-insensitive), or a one-line KeyError."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise KeyError(f"cluster.gpu={name!r} is not in the GPU table; known: {', '.join(GPUS)}")
    return GPUS[key]


def from_device_name(name: str) -> GPU | None:
    """Match a ``torch.cuda.get_device_name()`` string (e.g. 'NVIDIA H100 80GB HBM3')."""
    text = name.lower().replace(" ", "")
    for key in ("h200", "b200", "l40s"):
        if key in text:
            return GPUS[key]
    if "h100" in text:
        return GPUS["h100_pcie" if "pcie" in text else "h100"]
    if "a100" in text:
        return GPUS["a100_40gb" if "40gb" in text else "a100"]
    return None


@dataclass(frozen=True, slots=True)
class Cluster:
    """What the planner plans for: nodes x GPUs per node of one GPU type."""

    nodes: int
    gpus_per_node: int
    gpu: GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node
