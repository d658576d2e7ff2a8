"""The pp>1 step: megatron-core's pipeline schedule (1F1B, or interleaved with vpp), then
DeepSpeed reduces gradients over dp and takes the optimizer step.

Order inside one step (fixed):
1. the schedule runs ``grad_acc`` micro-batches forward and backward through every stage; the
   loss of each micro-batch is divided by ``grad_acc`` by the schedule;
2. tied embedding gradients are summed between the first and last stage (megatron's
   ``finalize_model_grads`` would, but it expects megatron's DDP wrapper);
3. ``engine.allreduce_gradients()`` averages over dp — exactly once per step (DeepSpeed runs with
   ``gradient_accumulation_steps=1`` here, so every step is a boundary);
4. the global gradient norm over tp x pp is computed (and, at ZeRO-0, applied as clipping);
5. ``engine.step()``.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mptk.compat.cpu import device_scope
from mptk.train.step import dp_mean, dp_sums, grad_norm, to_device


def chunks_of(engine) -> list[torch.nn.Module]:
    """The model chunks on this rank (a ModuleList when there are virtual stages)."""
    module = engine.module
    return list(module) if isinstance(module, torch.nn.ModuleList) else [module]


class _Span:
    def __init__(self, totals: dict, name: str):
        self.totals, self.name, self.t0 = totals, name, None

    def start(self, barrier: bool = False) -> None:
        self.t0 = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self.t0 is not None:
            self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - self.t0
            self.t0 = None


class PhaseTimers:
    """Stands in for megatron's ``Timers`` (``config.timers``): the schedule and the p2p layer
    call ``timers(name).start()/stop()`` around compute and every send/receive."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.spans: dict[str, _Span] = {}

    def __call__(self, name: str, log_level: int | None = None) -> _Span:
        if name not in self.spans:
            self.spans[name] = _Span(self.totals, name)
        return self.spans[name]

    def take(self) -> dict[str, float]:
        """Totals since the last call, then reset."""
        totals, self.totals = self.totals, {}
        for span in self.spans.values():
            span.totals = self.totals
        return totals


def attach_timers(engine) -> PhaseTimers:
    """One PhaseTimers shared by this rank's chunks."""
    timers = PhaseTimers()
    for chunk in chunks_of(engine):
        chunk.config.timers = timers
    return timers


def theoretical_bubble(pp: int, vpp: int, micro_batches: int) -> float:
    """Megatron's bubble fraction: (p-1)/(m+p-1); interleaved (p-1)/(v*m) (of ideal time)."""
    if vpp > 1:
        return (pp - 1) / (vpp * micro_batches)
    return (pp - 1) / (micro_batches + pp - 1)


def bubble_stats(timers: PhaseTimers, schedule_s: float) -> dict:
    """Seconds waiting in p2p per stage (gathered over pp) as a fraction of the schedule."""
    totals = timers.take()
    wait = sum(v for k, v in totals.items() if "send" in k or "recv" in k)
    mine = torch.tensor([wait, schedule_s], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(ps.get_pipeline_model_parallel_world_size())]
    dist.all_gather(gathered, mine, group=ps.get_pipeline_model_parallel_group())
    fractions = [float(g[0] / g[1]) if g[1] > 0 else 0.0 for g in gathered]
    return {"p2p_wait_s": [float(g[0]) for g in gathered], "bubble_by_stage": fractions,
            "bubble_measured": sum(fractions) / len(fractions)}


def forward_step_fn(recipe, collect: list):
    """megatron's ``forward_step_func``: next batch -> (output, loss_func)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output, reduce = recipe.forward(model, batch)

        def loss_func(out):
            loss, metrics = reduce(out)
            collect.append((loss.detach().clone(), metrics))
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def run_schedule(engine, recipe, batches: list[dict], cfg, forward_only: bool) -> list:
    """All micro-batches through the pipeline; returns [(loss, metrics)] on the last stage."""
    chunks, collect = chunks_of(engine), []
    with device_scope():
        get_forward_backward_func()(
            forward_step_func=forward_step_fn(recipe, collect),
            data_iterator=[iter(batches) for _ in chunks], model=chunks,
            num_microbatches=len(batches), seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size, forward_only=forward_only)
    return collect


def sync_tied_embeddings(engine) -> None:
    """Sum the tied word-embedding gradient between the first and last pipeline stage."""
    if ps.get_pipeline_model_parallel_world_size() == 1 or not ps.is_rank_in_embedding_group():
        return
    chunks = chunks_of(engine)
    holder = chunks[0] if ps.is_pipeline_first_stage(ignore_virtual=True) else chunks[-1]
    if not getattr(holder, "share_embeddings_and_output_weights", False):
        return
    weight = holder.shared_embedding_or_output_weight()
    if weight.grad is not None:
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def clip_(engine, norm: float, max_norm: float) -> None:
    """Scale gradients in place when ``norm > max_norm`` (ZeRO-0: they sit in ``.grad``)."""
    if max_norm <= 0 or norm <= max_norm:
        return
    scale = max_norm / (norm + 1e-6)
    for param in engine.module.parameters():
        if param.grad is not None:
            param.grad.mul_(scale)


def last_stage_mean(collect: list) -> torch.Tensor:
    """Mean loss on the last stage, shared with every pp rank (0 elsewhere before the sum)."""
    value = torch.stack([c[0] for c in collect]).mean() if collect else torch.zeros(())
    value = value.float().reshape(())
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    return value


def pipeline_step(engine, recipe, data, step: int, grad_acc: int, device, cfg, stats=None):
    """One optimizer step at pp>1; returns (loss averaged over micro-batches and dp, norm).
    ``stats``, a dict, receives the measured bubble when given."""
    batches = [to_device(data.batch(step, m), device) for m in range(grad_acc)]
    timers = getattr(chunks_of(engine)[0].config, "timers", None)
    if isinstance(timers, PhaseTimers):
        timers.take()  # drop what evaluation recorded
    start = time.perf_counter()
    collect = run_schedule(engine, recipe, batches, cfg, forward_only=False)
    if stats is not None and isinstance(timers, PhaseTimers):
        stats.update(bubble_stats(timers, time.perf_counter() - start))
    sync_tied_embeddings(engine)
    engine.allreduce_gradients()
    norm = grad_norm(engine.module) if engine.zero_optimization_stage() == 0 else None
    if norm is not None:
        clip_(engine, norm, cfg.optim.grad_clip)
    engine.step()
    norm = norm if norm is not None else float(engine.get_global_grad_norm())
    return dp_mean(last_stage_mean(collect)), norm


@torch.no_grad()
def pipeline_evaluate(engine, recipe, data, device, cfg) -> dict:
    """Held-out loss (and the recipe's summary) through a forward-only schedule."""
    engine.eval()
    batches = [to_device(b, device) for b in data.eval_batches()]
    collect = run_schedule(engine, recipe, batches, cfg, forward_only=True)
    engine.train()
    sums = {}
    for _, metrics in collect:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    sums = _share_from_last_stage(sums)
    return {"eval_loss": dp_mean(last_stage_mean(collect)), **recipe.eval_summary(dp_sums(sums))}


def _share_from_last_stage(sums: dict) -> dict:
    box = [sums]
    last = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[-1]
    dist.broadcast_object_list(box, src=last, group=ps.get_pipeline_model_parallel_group())
    return box[0]
