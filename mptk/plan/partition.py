"""Pipeline stage balance: how many transformer layers each (virtual) stage holds.

Pure functions. ``auto`` balances the cost model's forward FLOPs (:func:`mptk.plan.cost.stage_flops`),
in which the first stage also pays for the embedding and the last one for the output layer and
the loss, so neither becomes the bottleneck; an explicit list is validated. :func:`describe`
prints each stage's parameters, FLOPs and activation memory (Korthikanti et al. 2022:
s*b*h*(34 + 5*a*s/h) bytes per layer at 16-bit activations, divided by tp).
"""

from __future__ import annotations

from typing import Any, Optional

from mptk.config.schema import ModelConfig
from mptk.plan.cost import (
    Shape,
    embedding_flops,
    head_flops,
    korthikanti,
    layer_flops,
    numel,
    shape_of,
    stage_flops,
    stage_tensors,
)


class PartitionError(ValueError):
    """A stage list that cannot work, explained on one line."""


def balanced(m: Shape, stages: int) -> list[int]:
    """Layers per stage minimising the most expensive stage (dynamic programming)."""
    L, unit = m.layers, layer_flops(m)
    extra = [0.0] * stages
    extra[0] += embedding_flops(m)
    extra[-1] += head_flops(m)
    best: dict[tuple[int, int], tuple[float, list[int]]] = {(0, 0): (0.0, [])}
    for k in range(1, stages + 1):
        for i in range(k, L - (stages - k) + 1):
            options = [(max(best[(j, k - 1)][0], (i - j) * unit + extra[k - 1]),
                        best[(j, k - 1)][1] + [i - j])
                       for j in range(k - 1, i) if (j, k - 1) in best]
            best[(i, k)] = min(options, key=lambda o: (o[0], _spread(o[1])))
    return best[(L, stages)][1]


def _spread(counts: list[int]) -> int:
    """Tie-break between equally expensive splits: the most even one."""
    return max(counts) - min(counts)


def even_split(layers: int, stages: int) -> list[int]:
    """Layers per virtual stage, as even as possible (earlier stages get the remainder): what
    the search assumes, since balancing every candidate would cost more than it tells."""
    base, extra = divmod(layers, stages)
    return [base + (i < extra) for i in range(stages)]


def stage_layers(model: ModelConfig, pp: int, vpp: Optional[int], spec: Any) -> list[int]:
    """Layers per virtual stage, in virtual order (``pp * vpp`` entries)."""
    stages = pp * (vpp or 1)
    m = shape_of(model)
    if spec in (None, "auto"):
        if m.layers < stages:
            raise PartitionError(f"model.num_layers({m.layers}) < pp({pp})*vpp({vpp or 1}); "
                                 f"every stage needs a layer: use fewer stages or more layers")
        return balanced(m, stages)
    return validate(list(spec), m.layers, stages)


def validate(counts: list, layers: int, stages: int) -> list[int]:
    """An explicit list: ``stages`` positive integers summing to ``layers``."""
    where = "parallel.layers_per_stage"
    if len(counts) != stages:
        raise PartitionError(f"{where} has {len(counts)} entries but pp*vpp = {stages}; "
                             f"give one count per (virtual) stage")
    if any(not isinstance(c, int) or c < 1 for c in counts):
        raise PartitionError(f"{where}={counts}: every stage needs >= 1 layer")
    if sum(counts) != layers:
        raise PartitionError(f"{where}={counts} sums to {sum(counts)} but model.num_layers is "
                             f"{layers}; make them add up")
    return counts


def megatron_layout(counts: list[int]) -> list[list[str]]:
    """megatron-core's ``pipeline_model_parallel_layout``: one row per virtual stage."""
    rows = [["decoder"] * n for n in counts]
    rows[0] = ["embedding"] + rows[0]
    rows[-1] = rows[-1] + ["loss"]
    return rows


def describe(model: ModelConfig, pp: int, vpp: Optional[int], spec: Any, micro_batch: int,
             tp: int, micro_batches: int) -> list[dict]:
    """One row per virtual stage: rank, chunk, layers, parameters (per tp rank), forward
    GFLOPs per sample, activation memory of the micro-batches in flight (1F1B)."""
    m, counts = shape_of(model), stage_layers(model, pp, vpp, spec)
    rows = []
    for index, n in enumerate(counts):
        rank, first, last = index % pp, index == 0, index == len(counts) - 1
        flops = stage_flops(m, n, first, last)
        act = n * korthikanti(m.seq, micro_batch, m.hidden, m.heads, tp)
        rows.append({"stage": index, "rank": rank, "chunk": index // pp, "layers": n,
                     "params": numel(stage_tensors(m, tp, n, first, last, pp)),
                     "gflops_per_sample": flops / tp / 1e9,
                     "act_mb": act * min(micro_batches, pp - rank) / 2**20})
    return rows


def format_rows(rows: list[dict]) -> str:
    """:func:`describe`'s rows as a fixed-width table."""
    head = "stage rank chunk layers      params  GFLOP/sample  activations(MiB)"
    lines = [f"{r['stage']:>5} {r['rank']:>4} {r['chunk']:>5} {r['layers']:>6} "
             f"{r['params']:>11,} {r['gflops_per_sample']:>13.3f} {r['act_mb']:>17.1f}"
             for r in rows]
    return "\n".join([head, *lines])
