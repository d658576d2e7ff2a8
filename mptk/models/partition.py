"""Pipeline stage balance: how many transformer layers each (virtual) stage holds.

Pure functions. ``auto`` balances a cost model (forward FLOPs) in which the first stage also
pays for the embedding and the last one for the output layer and the loss, so neither becomes
the bottleneck; an explicit list is validated. :func:`describe` prints each stage's parameters,
FLOPs and activation memory (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer at
16-bit activations, divided by tp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mptk.config.schema import Activation, ModelConfig


class PartitionError(ValueError):
    """A stage list that cannot work, explained on one line."""


@dataclass(frozen=True, slots=True)
class Shape:
    """The model dimensions the cost model needs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    seq: int
    vocab: int
    gated: bool
    tied: bool


def shape_of(model: ModelConfig) -> Shape:
    h = model.hidden_size
    return Shape(layers=model.num_layers, hidden=h, heads=model.num_attention_heads,
                 kv_heads=model.num_query_groups or model.num_attention_heads,
                 ffn=model.ffn_hidden_size or 4 * h, seq=model.seq_length,
                 vocab=getattr(model, "vocab_size", 0),
                 gated=model.activation is Activation.swiglu,
                 tied=getattr(model, "tie_embeddings", False))


def layer_params(m: Shape) -> int:
    qkv = m.hidden * (m.hidden + 2 * m.hidden * m.kv_heads // m.heads)
    mlp = m.hidden * m.ffn * (3 if m.gated else 2)
    biases = qkv // m.hidden + m.hidden + m.ffn * (2 if m.gated else 1) + m.hidden
    return qkv + m.hidden * m.hidden + mlp + biases + 4 * m.hidden


def layer_flops(m: Shape) -> float:
    """Forward FLOPs of one layer for one sample."""
    return 2 * m.seq * layer_params(m) + 4 * m.seq * m.seq * m.hidden


def head_flops(m: Shape) -> float:
    """Output layer + softmax cross-entropy, one sample."""
    return 2 * m.seq * m.hidden * m.vocab + 5 * m.seq * m.vocab


def embedding_flops(m: Shape) -> float:
    """Lookup, position add and the scatter-add of its gradient, one sample (small)."""
    return 4 * m.seq * m.hidden


def activation_bytes(m: Shape, micro_batch: int, tp: int) -> float:
    """Korthikanti et al.: activations of one layer for one micro-batch (no recompute)."""
    return m.seq * micro_batch * m.hidden * (34 + 5 * m.heads * m.seq / m.hidden) / tp


def balanced(m: Shape, stages: int) -> list[int]:
    """Layers per stage minimising the most expensive stage (dynamic programming)."""
    L, unit = m.layers, layer_flops(m)
    extra = [0.0] * stages
    extra[0] += embedding_flops(m)
    extra[-1] += head_flops(m)
    best = {(0, 0): (0.0, [])}
    for k in range(1, stages + 1):
        for i in range(k, L - (stages - k) + 1):
            options = [(max(best[(j, k - 1)][0], (i - j) * unit + extra[k - 1]),
                        best[(j, k - 1)][1] + [i - j])
                       for j in range(k - 1, i) if (j, k - 1) in best]
            best[(i, k)] = min(options, key=lambda o: (o[0], _spread(o[1])))
    return best[(L, stages)][1]


def _spread(counts: list[int]) -> int:
    return max(counts) - min(counts)


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
    """One row per virtual stage: rank, chunk, layers, parameters, FLOPs, activation memory."""
    m, counts = shape_of(model), stage_layers(model, pp, vpp, spec)
    rows = []
    for index, n in enumerate(counts):
        rank, chunk = index % pp, index // pp
        first, last = index == 0, index == len(counts) - 1
        params = n * layer_params(m) + first * (m.vocab * m.hidden + m.seq * m.hidden) \
            + last * (2 * m.hidden + (m.vocab * m.hidden if (pp > 1 or not m.tied) else 0))
        flops = n * layer_flops(m) + first * embedding_flops(m) + last * head_flops(m)
        in_flight = min(micro_batches, pp - rank)
        rows.append({"stage": index, "rank": rank, "chunk": chunk, "layers": n,
                     "params": params // tp, "gflops_per_sample": flops / tp / 1e9,
                     "act_mb": n * activation_bytes(m, micro_batch, tp) * in_flight / 2**20})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = "stage rank chunk layers      params  GFLOP/sample  activations(MiB)"
    lines = [f"{r['stage']:>5} {r['rank']:>4} {r['chunk']:>5} {r['layers']:>6} "
             f"{r['params']:>11,} {r['gflops_per_sample']:>13.3f} {r['act_mb']:>17.1f}"
             for r in rows]
    return "\n".join([head, *lines])
