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

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mptk.compat.cpu import device_scope
from mptk.log.phases import Phases
from mptk.train.step import clip_, dp_mean, dp_sums, grad_norm, time_grad_reduce, to_device


def chunks_of(engine) -> list[torch.nn.Module]:
    """The model chunks on this rank (a ModuleList when there are virtual stages)."""
    module = engine.module
    return list(module) if isinstance(module, torch.nn.ModuleList) else [module]


def attach_timers(engine, phases: Phases) -> Phases:
    """Let megatron's schedule and p2p layer report into ``phases`` (its ``config.timers``)."""
    for chunk in chunks_of(engine):
        config: Any = chunk.config  # megatron's TransformerConfig
        config.timers = phases
    return phases


def theoretical_bubble(pp: int, vpp: int, micro_batches: int) -> float:
    """Megatron's bubble fraction: (p-1)/(m+p-1); interleaved (p-1)/(v*m) (of ideal time)."""
    if vpp > 1:
        return (pp - 1) / (vpp * micro_batches)
    return (pp - 1) / (micro_batches + pp - 1)


def bubble_stats(wait_s: float, schedule_s: float) -> dict:
    """Seconds waiting in p2p per stage (gathered over pp) as a fraction of the schedule."""
    mine = torch.tensor([wait_s, schedule_s], dtype=torch.float64)
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
            # megatron's schedule multiplies a returned loss by the cp size (its DDP sums over
            # cp); DeepSpeed averages over dp x cp, so undo it to match the pp=1 step.
            return loss / ps.get_context_parallel_world_size(), {"loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def run_schedule(engine, recipe, batches: list[dict], cfg, forward_only: bool) -> list:
    """All micro-batches through the pipeline; returns [(loss, metrics)] on the last stage."""
    chunks = chunks_of(engine)
    collect: list = []
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
    holder: Any = chunks[0] if ps.is_pipeline_first_stage(ignore_virtual=True) else chunks[-1]
    if not getattr(holder, "share_embeddings_and_output_weights", False):
        return
    weight = holder.shared_embedding_or_output_weight()
    if weight.grad is not None:
        dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def last_stage_mean(collect: list) -> torch.Tensor:
    """Mean loss on the last stage, shared with every pp rank (0 elsewhere before the sum)."""
    value = torch.stack([c[0] for c in collect]).mean() if collect else torch.zeros(())
    value = value.float().reshape(())
    dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    return value


def pipeline_step(engine, recipe, data, step: int, grad_acc: int, device, cfg, stats=None,
                  phases: Phases | None = None):
    """One optimizer step at pp>1; returns (loss averaged over micro-batches and dp, norm).
    ``stats``, a dict, receives the measured bubble when given; ``phases`` (the one attached
    as the chunks' ``config.timers``) the phase spans."""
    phases = phases if phases is not None else Phases()
    with phases.span("data"):
        batches = [to_device(data.batch(step, m), device) for m in range(grad_acc)]
    mark, start = phases.mark(), time.perf_counter()
    collect = run_schedule(engine, recipe, batches, cfg, forward_only=False)
    if stats is not None:
        wait = phases.seconds_since(mark, "p2p_wait")
        stats.update(bubble_stats(wait, time.perf_counter() - start))
    with phases.span("grad_reduce"):
        sync_tied_embeddings(engine)
        engine.allreduce_gradients()
    with phases.span("optimizer"):
        norm = grad_norm(engine.module) if engine.zero_optimization_stage() == 0 else None
        if norm is not None:
            clip_(engine.module, norm, cfg.optim.grad_clip)
        engine.step()
    norm = norm if norm is not None else float(engine.get_global_grad_norm())
    return dp_mean(last_stage_mean(collect)), norm


@torch.no_grad()
def pipeline_evaluate(engine, recipe, data, device, cfg) -> dict:
    """Held-out loss (and the recipe's summary) through a forward-only schedule."""
    engine.eval()
    batches = [to_device(b, device) for b in data.eval_batches()]
    config: Any = chunks_of(engine)[0].config
    timers = config.timers
    with timers.paused() if isinstance(timers, Phases) else contextlib.nullcontext():
        collect = run_schedule(engine, recipe, batches, cfg, forward_only=True)
    engine.train()
    sums: dict[str, float] = {}
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


class PipelineStep:
    """The pp>1 step strategy: megatron's schedule, then DeepSpeed's dp reduce and step.

    Same interface as :class:`mptk.train.step.EngineStep`; it also reports the pipeline
    bubble (theory and, per step, measured) through :meth:`figures`.
    """

    def __init__(self, engine, recipe, data, layout, device, cfg, phases: Phases):
        self.engine, self.recipe, self.data = engine, recipe, data
        self.device, self.cfg, self.phases = device, cfg, phases
        self.grad_acc = layout.grad_acc
        self.stats: dict[str, Any] = {}
        self.bubble_theory = theoretical_bubble(layout.pp, layout.vpp, layout.grad_acc)
        time_grad_reduce(engine, phases)
        attach_timers(engine, phases)

    def train(self, step: int) -> tuple[float, float]:
        """One optimizer step (0-based ``step``): (loss mean over micro-batches and dp, norm)."""
        return pipeline_step(self.engine, self.recipe, self.data, step, self.grad_acc,
                             self.device, self.cfg, stats=self.stats, phases=self.phases)

    def evaluate(self) -> dict:
        """Held-out metrics through a forward-only schedule."""
        return pipeline_evaluate(self.engine, self.recipe, self.data, self.device, self.cfg)

    def figures(self) -> dict:
        """The bubble of the last step (theory, then measured); the measurement is consumed."""
        out = {"bubble_theory": self.bubble_theory, **self.stats}
        self.stats.clear()
        return out
