"""Model TFLOP/s per device and MFU, with Megatron's model-FLOPs formula.

Model FLOPs count forward + backward without recomputation (Narayanan et al. 2021,
Korthikanti et al. 2022: ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` for a GPT), written per
layer in :func:`mptk.plan.cost.model_flops` on the shape the recipe states, so the planner and
the run report the same figure. A Mixture-of-Experts model counts the matmuls a token meets:
router, shared expert and ``topk`` experts (Megatron-LM's MoE formula, plus the router's
small matmul). MFU is model TFLOP/s per device over the device's peak dense
bf16 TFLOP/s: from ``cluster.peak_tflops`` when set, else the GPU table
(:mod:`mptk.plan.hardware`) by ``cluster.gpu`` or the CUDA device name. On CPU there is no
peak: TFLOP/s only, no MFU.
"""

from __future__ import annotations

from typing import Optional

import torch

from mptk.config.schema import ClusterConfig, ModelConfig
from mptk.plan import cost, hardware


def step_flops(model: ModelConfig, global_batch: int) -> float:
    """Model FLOPs of one optimizer step (all ranks together)."""
    return cost.model_flops(cost.shape_of(model), global_batch)


def peak_tflops(cluster: ClusterConfig, device: torch.device) -> Optional[float]:
    """Peak dense TFLOP/s of one device, or None when unknown (CPU, a GPU not in the table)."""
    if cluster.peak_tflops:
        return float(cluster.peak_tflops)
    if device.type != "cuda":
        return None
    gpu = hardware.gpu(cluster.gpu) if cluster.gpu else hardware.from_device_name(
        torch.cuda.get_device_name(device))
    return gpu.tflops if gpu is not None else None


def throughput(flops: float, seconds: float, world: int, peak: Optional[float]) -> dict:
    """``tflops_per_device`` and, with a known peak, ``mfu``."""
    tflops = flops / max(seconds, 1e-12) / world / 1e12
    return {"tflops_per_device": tflops} | ({"mfu": tflops / peak} if peak else {})
