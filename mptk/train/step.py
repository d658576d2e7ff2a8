"""One optimizer step and one evaluation on this rank (pp=1 path: the DeepSpeed engine runs
forward, backward and the step; gradient accumulation happens inside the engine)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mptk.dist import groups


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def dp_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over the data-parallel group (the loss is equal on tp/pp peers)."""
    value = value.detach().clone().float()
    dist.all_reduce(value, group=groups.dp_group())
    return value.item() / groups.dp_size()


def train_step(engine, recipe, data, step: int, grad_acc: int, device) -> float:
    """``grad_acc`` micro-batches, then DeepSpeed's step at the accumulation boundary."""
    losses = []
    for micro in range(grad_acc):
        batch = to_device(data.batch(step, micro), device)
        loss, _ = recipe.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().clone())
    return dp_mean(torch.stack(losses).mean())


@torch.no_grad()
def evaluate(engine, recipe, data, device) -> float:
    """Mean loss over the held-out micro-batches of every dp rank."""
    engine.eval()
    losses = [recipe.loss(engine, to_device(b, device))[0] for b in data.eval_batches()]
    engine.train()
    return dp_mean(torch.stack(losses).mean())
