"""One optimizer step and one evaluation on this rank (pp=1 path: the DeepSpeed engine runs
forward, backward and the step; gradient accumulation happens inside the engine)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mptk.log.phases import Phases
from mptk.parallel import groups


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def dp_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over dp x cp (the loss is equal on tp/pp peers). A cp rank's loss is
    the mean over its own tokens, and every cp rank holds the same number of tokens, so the
    mean over cp is the mean over all tokens of the sequence."""
    value = value.detach().clone().float()
    dist.all_reduce(value, group=groups.dp_cp_group())
    return value.item() / groups.dp_cp_size()


def counts_in_norm(param: torch.nn.Parameter) -> bool:
    """Once per logical parameter: tp shards everywhere, replicas on tp rank 0, and not the
    last stage's copy of a tied embedding (megatron marks it ``shared``)."""
    if getattr(param, "shared", False):
        return False
    return getattr(param, "tensor_model_parallel", False) or groups.tp_rank() == 0


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (dp-reduced) gradients over the tp x pp group.

    Tensor-parallel shards count on every tp rank; replicated parameters (norms, row-parallel
    biases) only on tp rank 0, as DeepSpeed's own clipping counts them.
    """
    from megatron.core import parallel_state as ps

    from mptk.engine.experts import is_expert

    device = next(model.parameters()).device
    dense, experts = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    for param in model.parameters():
        if param.grad is not None and counts_in_norm(param):
            square = param.grad.detach().double().pow(2).sum()
            if is_expert(param):
                experts += square
            else:
                dense += square
    if groups.ep_size() > 1:  # the ep peers hold the other experts
        dist.all_reduce(experts, group=groups.ep_group())
    total = dense + experts
    dist.all_reduce(total, group=ps.get_model_parallel_group())  # on the grads' device (NCCL)
    return total.sqrt().item()  # the one host sync


def time_grad_reduce(engine, phases: Phases) -> None:
    """Time DeepSpeed's gradient reduction as the ``grad_reduce`` phase: the engine calls its
    own ``allreduce_gradients`` at the end of backward (pp=1) and mptk calls it at pp>1."""
    inner = engine.allreduce_gradients

    def timed(*args, **kwargs):
        with phases.span("grad_reduce"):
            return inner(*args, **kwargs)

    engine.allreduce_gradients = timed


def train_step(engine, recipe, data, step: int, grad_acc: int, device,
               phases: Phases | None = None, clip: float = 0.0) -> tuple[float, float]:
    """``grad_acc`` micro-batches, then DeepSpeed's step at the accumulation boundary.

    Returns the loss (mean over micro-batches and dp) and the gradient norm before clipping.
    ``clip`` > 0 (ZeRO-0 with experts: DeepSpeed's own clipping averages per-rank norms, which
    differ across ep ranks) clips with that norm here.
    """
    phases = phases if phases is not None else Phases()
    losses, norm = [], None
    for micro in range(grad_acc):
        with phases.span("data"):
            batch = to_device(data.batch(step, micro), device)
        with phases.span("forward"):
            loss, _ = recipe.loss(engine, batch)
        with phases.span("backward"):
            engine.backward(loss)
        with phases.span("optimizer"):
            if micro == grad_acc - 1 and engine.zero_optimization_stage() == 0:
                norm = grad_norm(engine.module)  # stage 0 keeps no norm; grads are reduced here
                clip_(engine.module, norm, clip)
            engine.step()
        losses.append(loss.detach().clone())
    norm = norm if norm is not None else float(engine.get_global_grad_norm())
    return dp_mean(torch.stack(losses).mean()), norm


def clip_(model: torch.nn.Module, norm: float, max_norm: float) -> None:
    """Scale gradients in place when ``norm > max_norm`` (ZeRO-0: they sit in ``.grad``)."""
    if max_norm <= 0 or norm <= max_norm:
        return
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(max_norm / (norm + 1e-6))


def dp_sums(sums: dict) -> dict:
    """Per-key sums over dp x cp (a cp rank counts its own tokens)."""
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, group=groups.dp_cp_group())
    return dict(zip(keys, values.tolist()))


@torch.no_grad()
def evaluate(engine, recipe, data, device) -> dict:
    """Held-out metrics over every dp rank: ``eval_loss`` plus the recipe's summary."""
    engine.eval()
    losses: list[torch.Tensor] = []
    sums: dict[str, float] = {}
    for batch in data.eval_batches():
        loss, metrics = recipe.loss(engine, to_device(batch, device))
        losses.append(loss.detach().clone())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    engine.train()
    return {"eval_loss": dp_mean(torch.stack(losses).mean()),
            **recipe.eval_summary(dp_sums(sums))}


class EngineStep:
    """The pp=1 step strategy: DeepSpeed's engine runs every micro-batch itself.

    Same interface as :class:`mptk.train.pipeline.PipelineStep`: :meth:`train`,
    :meth:`evaluate` and :meth:`figures`; the trainer picks one of the two once, at setup.
    """

    def __init__(self, engine, recipe, data, grad_acc: int, device, phases: Phases,
                 clip: float = 0.0):
        self.engine, self.recipe, self.data = engine, recipe, data
        self.grad_acc, self.device, self.phases, self.clip = grad_acc, device, phases, clip
        time_grad_reduce(engine, phases)
        from mptk.models import moe
        from mptk.parallel import groups

        # As DeepSpeed divides the main loss by grad_acc; times cp as megatron's schedule does at
        # pp>1: a cp rank's aux loss is its share of the sequence's (tokens per expert are counted
        # over tp x cp) and DeepSpeed averages gradients over dp x cp, so the shares must add up.
        moe.set_aux_loss_scale(groups.cp_size() / grad_acc)

    def train(self, step: int) -> tuple[float, float]:
        """One optimizer step (0-based ``step``): (loss mean over micro-batches and dp, norm)."""
        return train_step(self.engine, self.recipe, self.data, step, self.grad_acc, self.device,
                          self.phases, self.clip)

    def evaluate(self) -> dict:
        """Held-out metrics over every dp rank."""
        return evaluate(self.engine, self.recipe, self.data, self.device)

    def figures(self) -> dict:
        """What this strategy adds to the last step's metrics row: nothing at pp=1."""
        return {}
