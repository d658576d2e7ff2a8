"""Gradient reductions megatron's ``finalize_model_grads`` would do, for the parameters whose
gradient is a partial sum over the tensor-parallel group.

DeepSpeed reduces gradients over the data-parallel group only. Under sequence parallelism each
tp rank normalises its own slice of the sequence, so a norm's weight/bias gradient is that
slice's share: the tp ranks' gradients must be *added* before (or, being linear, independently
of) DeepSpeed's dp average. A hook on the parameter does it as the gradient is produced, before
it is accumulated into ``.grad`` and before any of DeepSpeed's own hooks see it, so it holds at
every ZeRO stage, with gradient accumulation and under megatron's pipeline schedules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def partial_over_tp(param: torch.nn.Parameter) -> bool:
    """Marked by megatron (or :mod:`mptk.models.norms`) as a per-sequence-slice gradient."""
    return bool(getattr(param, "sequence_parallel", False))


def sum_over_tp(model: torch.nn.Module, tp_group: Any, tp_size: int) -> int:
    """Register the tp all-reduce on every partial-gradient parameter; returns how many."""
    if tp_size < 2:
        return 0
    params = [p for p in model.parameters() if p.requires_grad and partial_over_tp(p)]
    for param in params:
        param.register_hook(_all_reduce(tp_group))
    return len(params)


def _all_reduce(group: Any):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total
    return hook
