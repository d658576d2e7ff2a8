"""The cost model of one model: parameters per rank, FLOPs, activation bytes.

One module serves the planner (:mod:`mptk.plan.memory`, :mod:`mptk.plan.perf`), pipeline stage
balancing (:mod:`mptk.plan.partition`) and the FLOP/s a run logs (:mod:`mptk.log.flops`), so the
three never disagree. It reads a :class:`~mptk.config.shape.Shape`, which each recipe states
(``Recipe.shape``): nothing here knows a recipe by name, only the kinds of ends
(:class:`Embedding`, :class:`Head`).

Parameters are counted tensor by tensor as megatron-core's local spec builds them; FLOPs follow
Megatron's formula written per layer (so it holds for SwiGLU and GQA too); activations follow
Korthikanti et al. 2022, Table 2. A Mixture-of-Experts model (:class:`MoEShape`) splits each
layer's tensors into dense ones (attention, router, shared expert) and expert ones (split over
ep); its FLOPs count the active parameters (top-k experts per token).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from mptk.config import registry
from mptk.config.schema import ModelConfig
from mptk.config.shape import Embedding, Head, Shape

__all__ = [
    "cp_alltoall_bytes", "local_sequence", "MoEShape", "active_params", "ep_alltoall_bytes",
    "dense_layer_tensors", "expert_tensors", "moe_activations",
    "Embedding", "Head", "Shape", "Tensors", "embedding_flops", "hardware_flops", "head_bytes",
    "dropout_masks", "head_flops", "korthikanti", "largest_layer", "layer_activations", "layer_flops",
    "layer_forward", "layer_matmul_params", "layer_tensors", "logits", "loss_flops",
    "megatron_flops", "model_flops", "numel", "output_flops", "param_groups",
    "recompute_transient", "recomputed_layers", "shape_of", "stage_activations", "stage_flops",
    "stage_tensors", "tensor_count", "total_params",
]


@dataclass(frozen=True, slots=True)
class MoEShape(Shape):
    """A Mixture-of-Experts model: every layer's MLP is a router, ``experts`` expert MLPs of
    width ``expert_ffn`` (``topk`` per token) and an optional shared expert; no biases
    (megatron's expert MLP cannot take them, the preflight asks for ``model.bias=false``)."""

    experts: int = 0
    topk: int = 1
    expert_ffn: int = 0
    shared_ffn: int = 0
    """Width of the shared expert every token also goes through (0: none)."""


def shape_of(model: ModelConfig) -> Shape:
    """The :class:`Shape` the model's recipe states for this config (a :class:`MoEShape` when
    ``model.num_experts`` is set)."""
    base = registry.get(model.recipe).shape(model)
    experts = getattr(model, "num_experts", None) or 0
    if not experts:
        return base
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return MoEShape(**fields, experts=experts, topk=model.moe_topk,
                    expert_ffn=model.moe_ffn_hidden_size or base.ffn,
                    shared_ffn=model.moe_shared_expert_hidden_size or 0)


# --------------------------------------------------------------------------- parameters

Tensors = Counter
"""``{(numel, is_matrix): count}``: the parameter tensors one rank holds (mptk puts
matrices in the weight-decay group and vectors in the other, :func:`param_groups`)."""


def _norm(s: Shape) -> list[tuple[int, bool]]:
    return [(s.hidden, False)] if s.rms else [(s.hidden, False), (s.hidden, False)]


def _mlp(h: int, ffn: int, gated: bool, tp: int, bias: bool = True) -> list[tuple[int, bool]]:
    """fc1 (twice as wide when gated) and fc2 of one MLP on one tp rank."""
    fc1 = ffn * (2 if gated else 1) // tp
    return [(fc1 * h, True), (h * ffn // tp, True)] + ([(fc1, False), (h, False)] if bias else [])


def _attention(s: Shape, tp: int, bias: bool = True) -> list[tuple[int, bool]]:
    """Input norm, qkv and output projection on one tp rank."""
    h, d = s.hidden, s.hidden // s.heads
    qkv = (s.heads + 2 * s.kv_heads) * d // tp
    return [*_norm(s), (qkv * h, True), (h * h // tp, True)] + ([(qkv, False), (h, False)] if bias else [])


def layer_tensors(s: Shape, tp: int, ep: int = 1) -> list[tuple[int, bool]]:
    """One megatron transformer layer (local spec) on one tp rank; a MoE layer's
    experts split over ``ep`` ranks (expert tp = tp, megatron's default)."""
    return dense_layer_tensors(s, tp) + expert_tensors(s, tp, ep)


def dense_layer_tensors(s: Shape, tp: int) -> list[tuple[int, bool]]:
    """The tensors of one layer every ep rank holds: attention, and the dense MLP or the
    router (replicated over tp) and the shared expert. The linears' biases follow
    ``s.bias`` (megatron's ``add_bias_linear``; the norms keep theirs)."""
    if not isinstance(s, MoEShape):
        return [*_attention(s, tp, s.bias), *_norm(s), *_mlp(s.hidden, s.ffn, s.gated, tp, s.bias)]
    shared = _mlp(s.hidden, s.shared_ffn, s.gated, tp, bias=False) if s.shared_ffn else []
    return [*_attention(s, tp, bias=False), *_norm(s), (s.experts * s.hidden, True), *shared]


def expert_tensors(s: Shape, tp: int, ep: int) -> list[tuple[int, bool]]:
    """One layer's experts on one rank: ``experts / ep`` expert MLPs split over tp."""
    if not isinstance(s, MoEShape):
        return []
    return _mlp(s.hidden, s.expert_ffn, s.gated, tp, bias=False) * (s.experts // ep)


def _embedding_tensors(s: Shape, tp: int) -> list[tuple[int, bool]]:
    """The first stage's tensors before the layers."""
    positions = [(s.seq * s.hidden, True)] if s.learned_pos else []
    if s.embedding is Embedding.tokens:
        return [(s.vocab // tp * s.hidden, True), *positions]
    if s.embedding is Embedding.patches:  # conv1 (no bias), positions, class token [1,1,h], ln_pre
        return [(s.hidden * s.patch_inputs, True), *positions, (s.hidden, True), *_norm(s)]
    return []


def _head_tensors(s: Shape, tp: int, first: bool, pp: int) -> list[tuple[int, bool]]:
    """The last stage's tensors after the layers."""
    if s.head is Head.lm:
        # tied at pp>1: the last stage keeps its own copy of the table (synced by training)
        own = not s.tied or (pp > 1 and not first)
        return [*_norm(s)] + ([(s.vocab // tp * s.hidden, True)] if own else [])
    if s.head is Head.classes:
        return [*_norm(s), (s.classes * s.hidden, True), (s.classes, False)]
    return []


def stage_tensors(s: Shape, tp: int, layers: int, first: bool, last: bool, pp: int = 1,
                  ep: int = 1, part: str = "all") -> Tensors:
    """Parameter tensors of one rank holding ``layers`` layers (and the ends it owns);
    ``part``: ``all``, ``dense`` (what every ep rank holds) or ``experts`` (its share of the
    experts, which ZeRO partitions over the expert-data-parallel group)."""
    counts: Tensors = Counter()
    if part != "experts":
        counts.update((_embedding_tensors(s, tp) if first else [])
                      + (_head_tensors(s, tp, first, pp) if last else []))
    layer = {"all": layer_tensors(s, tp, ep), "dense": dense_layer_tensors(s, tp),
             "experts": expert_tensors(s, tp, ep)}[part]
    for key, n in Counter(layer).items():
        counts[key] += n * layers
    return counts


def total_params(s: Shape) -> int:
    """Parameters of the whole model (tp=1, pp=1), every expert included."""
    return numel(stage_tensors(s, 1, s.layers, True, True))


def active_params(s: Shape) -> int:
    """Parameters one token goes through: the dense ones and ``topk`` experts per layer (the
    total for a dense model)."""
    if not isinstance(s, MoEShape):
        return total_params(s)
    expert = sum(n for n, _ in _mlp(s.hidden, s.expert_ffn, s.gated, 1, bias=False))
    return total_params(s) - s.layers * (s.experts - s.topk) * expert


def numel(t: Tensors) -> int:
    """Elements of all tensors in ``t``."""
    return sum(n * c for (n, _), c in t.items())


def param_groups(t: Tensors) -> list[int]:
    """Elements in mptk's two optimizer groups (decay: matrices; no decay: vectors)."""
    groups = [sum(n * c for (n, m), c in t.items() if m), sum(n * c for (n, m), c in t.items() if not m)]
    return [g for g in groups if g]


def tensor_count(t: Tensors) -> int:
    """Number of tensors in ``t`` (AdamW keeps a ``step`` per tensor at ZeRO-0)."""
    return sum(t.values())


def largest_layer(s: Shape, tp: int, ep: int = 1) -> int:
    """Elements of one layer on one tp rank (what ZeRO-3 gathers at a time)."""
    return sum(n for n, _ in layer_tensors(s, tp, ep))


# --------------------------------------------------------------------------- FLOPs


def megatron_flops(batch: int, s: int, l: int, h: int, v: int) -> float:  # noqa: E741 (the paper's symbols)
    """Model FLOPs per step (Korthikanti et al. 2022): 72 B s l h^2 (1 + s/(6h) + V/(12 l h))."""
    return 72 * batch * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


def layer_matmul_params(s: Shape) -> int:
    """Matrix elements one token meets in a layer (tp=1): qkv, projection, MLP (a MoE layer:
    the router, the shared expert and ``topk`` experts)."""
    dense = sum(n for n, matrix in dense_layer_tensors(s, 1) if matrix)
    if not isinstance(s, MoEShape):
        return dense
    return dense + s.topk * sum(n for n, _ in _mlp(s.hidden, s.expert_ffn, s.gated, 1, bias=False))


def layer_forward(s: Shape) -> tuple[float, float]:
    """(matmul, attention-core) forward FLOPs of one layer for one sample."""
    return 2 * s.seq * layer_matmul_params(s), 4 * s.seq * s.seq * s.hidden


def layer_flops(s: Shape) -> float:
    """Forward FLOPs of one layer for one sample (matmuls + attention core)."""
    return sum(layer_forward(s))


def logits(s: Shape) -> tuple[int, int]:
    """(positions, outputs) of the head's logits per sample: the LM head scores the vocabulary
    at every position, a class head its classes on the class token."""
    if s.head is Head.lm:
        return s.seq, s.vocab
    if s.head is Head.classes:
        return 1, s.classes
    return 0, 0


def output_flops(s: Shape) -> float:
    """Forward FLOPs of the output layer per sample (the logits' matmul)."""
    positions, outputs = logits(s)
    return 2 * positions * s.hidden * outputs


def loss_flops(s: Shape) -> float:
    """Softmax cross-entropy over the logits, one sample (about 5 operations per logit)."""
    positions, outputs = logits(s)
    return 5 * positions * outputs


def head_flops(s: Shape) -> float:
    """What the last stage runs after its layers, one sample: output layer + loss."""
    return output_flops(s) + loss_flops(s)


def embedding_flops(s: Shape) -> float:
    """Lookup, position add and the scatter-add of its gradient, one sample (small)."""
    return 0.0 if s.embedding is Embedding.none else 4 * s.seq * s.hidden


def stage_flops(s: Shape, layers: int, first: bool, last: bool) -> float:
    """Forward FLOPs per sample of a stage holding ``layers`` layers and the ends it owns
    (the cost :mod:`mptk.plan.partition` balances)."""
    return layers * layer_flops(s) + first * embedding_flops(s) + last * head_flops(s)


def model_flops(s: Shape, batch: int) -> float:
    """Forward + backward FLOPs per step without recomputation: Megatron's formula, written
    per layer so it also holds for gated MLPs and grouped-query attention."""
    matmul, core = layer_forward(s)
    return 3 * batch * (s.layers * (matmul + core) + output_flops(s))


def hardware_flops(s: Shape, batch: int, recompute: str, share: float = 1.0) -> float:
    """FLOPs actually executed: full recompute repeats the forward of the recomputed layers
    (``share`` of them: :func:`recomputed_layers`), selective the attention core of every layer."""
    matmul, core = layer_forward(s)
    extra = {"full": (matmul + core) * share, "selective": core}.get(recompute, 0.0)
    return model_flops(s, batch) + batch * s.layers * extra


def recomputed_layers(layers: int, recompute: str, method: str = "uniform", group: int = 1) -> int:
    """Layers of one model chunk whose forward reruns in backward under full recompute
    (``train.recompute_method`` / ``train.recompute_layers``): uniform all of them, block the
    first ``group``; 0 otherwise (selective reruns only the attention core)."""
    if recompute != "full":
        return 0
    return min(max(0, group), layers) if method == "block" else layers


# --------------------------------------------------------------------------- activations


def korthikanti(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                recompute: str = "none") -> float:
    """Activation bytes of one transformer layer, 16-bit activations (Korthikanti et al.
    2022, Table 2): sbh(34 + 5as/h) unparallelised; tp t: sbh(10 + 24/t + 5as/(ht));
    with sequence parallel sbh/t (34 + 5as/h); selective recompute drops the 5as/h term;
    full recompute keeps only the layer input, 2sbh (/t with sequence parallel)."""
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    attn = 0.0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return sbh / t * (34 + attn)
    return sbh * (10 + 24 / t + attn / t)


def dropout_masks(s: Shape, micro: int, tp: int, sp: bool, recompute: str) -> float:
    """Elements of the dropout masks one layer keeps (the formula's 1-byte terms): the two
    hidden dropouts' ``sbh`` (/tp with sequence parallelism) and, when the score matrices are
    kept (no recompute, not SDPA), the attention dropout's ``as^2b/tp``."""
    if recompute == "full":
        return 0.0
    hidden = 2 * s.seq * micro * s.hidden / (tp if sp else 1)
    kept_scores = recompute == "none" and not s.flash
    return hidden + (s.heads * s.seq * s.seq * micro / tp if kept_scores else 0.0)


def layer_activations(s: Shape, micro: int, tp: int, sp: bool, recompute: str, w: int,
                      mask: float = 1.0) -> float:
    """Korthikanti's per-layer bytes for this model: SDPA keeps no score matrix (as selective
    recompute); ``w``-byte activations scale every term but the dropout masks, which take
    ``mask`` bytes an element (1 on a GPU, where torch keeps a bool mask; on the CPU torch keeps
    the scaled noise in the activation dtype, ``mask = w``: docs/memory_levers.md)."""
    mode = "selective" if s.flash and recompute == "none" else recompute
    masks = dropout_masks(s, micro, tp, sp, mode)
    dense = korthikanti(s.seq, micro, s.hidden, s.heads, tp, sp, mode) + moe_activations(s, micro, tp, sp, mode)
    return dense * (w / 2) + masks * (mask - w / 2)


def moe_activations(s: Shape, micro: int, tp: int, sp: bool, recompute: str) -> float:
    """16-bit bytes a MoE layer keeps beyond Korthikanti's dense layer (roughly, at a balanced
    load), whose 4h MLP keeps its fc1 output and activation (16sbh/t). A MoE layer keeps
    instead ``topk`` copies of every token in the dispatcher, whole on every tp rank of the
    expert (its input, and its output for the router-probability weighting at the combine:
    4 topk sbh), each copy's fc1 output and activation (2 topk sb (fc1 + ffn)/t), the shared
    expert's (2 sb (fc1 + ffn)/t) and the fp32 router logits and probabilities (8 sbE, /t with
    sequence parallelism). Full recompute keeps the layer input only: nothing extra."""
    if not isinstance(s, MoEShape) or recompute == "full":
        return 0.0
    sb, widths = s.seq * micro, 3 if s.gated else 2
    experts = 4 * s.topk * sb * s.hidden + 2 * s.topk * sb * widths * s.expert_ffn / tp
    shared = 2 * sb * widths * s.shared_ffn / tp
    router = 8 * sb * s.experts / (tp if sp else 1)
    return experts + shared + router - 16 * sb * s.hidden / tp


def stage_activations(s: Shape, micro: int, tp: int, sp: bool, recompute: str, w: int,
                      layers: int, method: str = "uniform", group: int = 1, mask: float = 1.0) -> float:
    """Activation bytes one model chunk of ``layers`` layers keeps per micro-batch until its
    backward. Full recompute, ``uniform``: each group of ``group`` layers keeps its input only
    (``ceil(layers / group)`` layer inputs); ``block``: the first ``group`` layers keep their
    input, the others all their activations (as ``none``)."""
    if recompute != "full":
        return layers * layer_activations(s, micro, tp, sp, recompute, w, mask)
    inputs = layer_activations(s, micro, tp, sp, "full", w, mask)
    if method == "block":
        done = recomputed_layers(layers, recompute, method, group)
        return done * inputs + (layers - done) * layer_activations(s, micro, tp, sp, "none", w, mask)
    return -(-layers // max(1, group)) * inputs if layers else 0.0


def recompute_transient(s: Shape, micro: int, tp: int, sp: bool, recompute: str, w: int,
                        layers: int, method: str = "uniform", group: int = 1,
                        mask: float = 1.0) -> float:
    """Bytes full recompute rebuilds for one micro-batch during backward on top of what is
    kept: one checkpointed group's activations (uniform: ``group`` layers at once, block: one
    layer at a time)."""
    done = recomputed_layers(layers, recompute, method, group)
    if not done:
        return 0.0
    at_once = 1 if method == "block" else min(max(1, group), layers)
    return at_once * layer_activations(s, micro, tp, sp, "none", w, mask)


def local_sequence(s: Shape, cp: int) -> Shape:
    """The shape one context-parallel rank works on: seq/cp tokens of every sequence. With
    Ulysses every per-token activation shrinks by cp and core attention (which runs on the
    whole sequence for heads/cp heads) holds the same element count, so a rank's activations
    are those of the model at seq/cp."""
    return s if cp <= 1 else dataclasses.replace(s, seq=s.seq // cp)


def cp_alltoall_bytes(s: Shape, micro: int, tp: int, cp: int, w: int) -> float:
    """Bytes one rank sends per layer and micro-batch, forward + backward: Ulysses moves
    q, k, v and the output (k and v at the query-group count) through four all-to-alls each
    way, each rank keeping 1/cp of what it holds."""
    if cp <= 1:
        return 0.0
    token = s.seq // cp * micro * s.hidden // max(1, s.heads) * w / tp
    heads = 2 * s.heads + 2 * (s.kv_heads or s.heads)
    return 2 * token * heads * (cp - 1) / cp


def ep_alltoall_bytes(s: Shape, micro: int, tp: int, sp: bool, ep: int, w: int) -> float:
    """Bytes one rank sends per MoE layer and micro-batch, forward + backward: the dispatch and
    combine all-to-alls, each way, carry ``topk`` copies of the rank's tokens (s b, /tp with
    sequence parallelism), each rank keeping the 1/ep bound for its own experts."""
    if not isinstance(s, MoEShape) or ep <= 1:
        return 0.0
    tokens = s.seq * micro / (tp if sp else 1)
    return 4 * s.topk * tokens * s.hidden * w * (ep - 1) / ep


def head_bytes(s: Shape, micro: int, tp: int, sp: bool = False, w: int = 2) -> float:
    """Last stage, saved for backward: the fp32 logits (megatron's vocab-parallel cross-entropy
    computes the softmax in place, so one 4-byte tensor per logit / tp) and three hidden-sized
    tensors at the ends (embedding dropout, final norm input, output layer input; /tp with
    sequence parallelism). Measured on the CPU by ``bench/memory_levers.py``."""
    positions, outputs = logits(s)
    ends = 3 * s.seq * micro * s.hidden * w / (tp if sp else 1)
    return 4 * positions * micro * outputs / tp + ends
