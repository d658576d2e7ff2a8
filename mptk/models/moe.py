"""Mixture-of-Experts pieces around megatron-core's ``MoELayer`` (built through the local spec
in :mod:`mptk.models.megatron`): the scale of the load-balancing loss's gradient and the
figures logged at log steps (aux loss, per-expert token load).

megatron's router attaches the aux loss to its output with ``MoEAuxLossAutoScaler``, whose
backward injects ``coeff * d(aux)`` times a class-wide scale. megatron's pipeline schedule
sets that scale to ``cp / micro-batches`` itself; on the pp=1 path DeepSpeed divides the main
loss by its gradient-accumulation steps, so the aux loss must be scaled the same way (else its
weight would grow with grad_acc and a dp=4 run would not equal a one-process one).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

AUX_LOSS = "load_balancing_loss"
"""megatron's tracker name of the switch load-balancing loss (``moe_router_load_balancing_type=aux_loss``)."""


def set_aux_loss_scale(scale: float) -> None:
    """The aux loss gradient's factor, matching the main loss's (``1 / grad_acc`` at pp=1)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # Shape [1], as megatron's pipeline schedule sets it (the scale is copied into in place).
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor([scale], dtype=torch.float32))


def routers(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The MoE routers of this rank's model chunks (one per MoE layer)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]


class MoEStats:
    """Per-expert token counts of the training forwards since the last read, from a forward
    hook on each router (its ``routing_map``: tokens x experts, True where routed), and
    megatron's aux-loss tracker. :meth:`read` is a collective over the whole world."""

    def __init__(self, chunks: list[torch.nn.Module], num_layers: int, num_experts: int,
                 partial_over: int = 1):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.calls = 0
        # tp x cp ranks route their own tokens and megatron's router gives each its share of
        # the aux loss: their values add up to one (megatron's tracker sums them likewise).
        self.partial_over = partial_over
        for router in routers(chunks):
            router.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training:
            return
        routing_map, layer = output[1], int(module.layer_number)  # type: ignore[arg-type]
        self.counts[layer - 1] += routing_map.detach().sum(0).to("cpu", torch.float64)
        self.calls += 1

    def read(self) -> dict[str, float]:
        """``moe_aux_loss`` (the unweighted load-balancing loss, mean over MoE layers, micro-
        batches and ranks) and ``moe_load_min`` / ``moe_load_max``: over layers and experts, an
        expert's share of the routed tokens times the number of experts (1 = balanced), summed
        over every rank's tokens. Resets both."""
        aux = _aux_loss_sum()
        totals = torch.cat([self.counts.flatten(), torch.tensor([aux, float(self.calls)],
                                                                dtype=torch.float64)])
        dist.all_reduce(totals)
        counts = totals[:-2].view_as(self.counts)
        self.counts.zero_()
        self.calls = 0
        routed = counts.sum(-1, keepdim=True)
        load = (counts * counts.shape[-1] / routed.clamp_min(1))[routed.squeeze(-1) > 0]
        layer_calls = (totals[-1] / self.partial_over).clamp_min(1)
        figures = {"moe_aux_loss": float(totals[-2] / layer_calls)}
        if load.numel():
            figures |= {"moe_load_min": float(load.min()), "moe_load_max": float(load.max())}
        return figures


def _aux_loss_sum() -> float:
    """Sum of the aux-loss values megatron's routers recorded (one per layer and training
    forward) since the last call; clears the tracker."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get(AUX_LOSS)
    if entry is None:
        return 0.0
    total = float(entry["values"].detach().double().sum())
    entry["values"].zero_()
    return total
