"""Expert parameters handed to DeepSpeed as its own MoE parameters, over megatron's groups.

megatron marks expert parameters ``allreduce=False`` at ep>1 (their gradient must not be
averaged over all of dp: the ranks of one ep group hold different experts). DeepSpeed reads
that same flag as "a DeepSpeed-MoE parameter" and then wants three things it normally gets from
its own ``deepspeed.moe.layer.MoE``: a ``group_name`` on each such parameter, that name's expert
and expert-data-parallel groups in ``deepspeed.utils.groups``, and a MoE module in the model
(only then does the engine reduce expert gradients separately). :func:`bridge` gives it all
three from megatron's parallel_state, so at ZeRO 0-2 DeepSpeed sums expert gradients over the
expert-data-parallel group and divides by dp x cp (the same scaling as megatron's DDP: every
expert saw tokens of its whole ep group), and partitions ZeRO state of experts over that group.
"""

from __future__ import annotations

from typing import Any

import torch


def is_expert(param: torch.nn.Parameter) -> bool:
    """megatron's mark of an expert-parallel parameter (set only at ep > 1)."""
    return not getattr(param, "allreduce", True)


def group_name(ep: int) -> str:
    """The name DeepSpeed files megatron's expert groups under."""
    return f"mptk_ep_size_{ep}"


def bridge(model: torch.nn.Module, ep: int, ep_group: Any, expert_dp_group: Any) -> int:
    """Name every expert parameter's group, register megatron's groups with DeepSpeed and mark
    the model as holding MoE layers. Returns the number of expert parameters (0: nothing done)."""
    params = [p for p in model.parameters() if is_expert(p)]
    if not params:
        return 0
    from deepspeed.utils import groups as ds_groups

    name = group_name(ep)
    for param in params:
        param.group_name = name  # type: ignore[attr-defined]
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_dp_group
    if not any(isinstance(m, _marker_class()) for m in model.modules()):
        model.add_module("deepspeed_moe_marker", _marker_class()(ep))
    return len(params)


def split_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the expert parameters in groups of their own
    (``moe: True``), as DeepSpeed's ZeRO requires; unchanged without experts."""
    if not any(is_expert(p) for g in groups for p in g["params"]):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **g} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


_MARKER: type | None = None


def _marker_class() -> type:
    """A parameter-free ``deepspeed.moe.layer.MoE``: the engine looks for one to turn on its
    expert-gradient path. Its groups are megatron's (already registered by :func:`bridge`)."""
    global _MARKER
    if _MARKER is None:
        from deepspeed.moe.layer import MoE

        class ExpertsMarker(MoE):
            def __init__(self, ep: int) -> None:
                torch.nn.Module.__init__(self)
                self.num_experts = ep
                self.ep_size = ep
                self.expert_group_name = group_name(ep)

            def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
                return None  # megatron's groups, registered by bridge()

            def forward(self, *args, **kwargs):  # never called: megatron's MoELayer computes
                raise RuntimeError("ExpertsMarker only marks the model for DeepSpeed")

        _MARKER = ExpertsMarker
    return _MARKER
