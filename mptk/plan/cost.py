"""The cost model of one model: parameters per rank, FLOPs, activation bytes.

One module serves the planner (:mod:`mptk.plan.memory`, :mod:`mptk.plan.perf`), pipeline stage
balancing (:mod:`mptk.plan.partition`) and the FLOP/s a run logs (:mod:`mptk.log.flops`), so the
three never disagree. It reads a :class:`~mptk.config.shape.Shape`, which each recipe states
(``Recipe.shape``): nothing here knows a recipe by name, only the kinds of ends
(:class:`Embedding`, :class:`Head`).

Parameters are counted tensor by tensor as megatron-core's local spec builds them; FLOPs follow
Megatron's formula written per layer (so it holds for SwiGLU and GQA too); activations follow
Korthikanti et al. 2022, Table 2.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from mptk.config import registry
from mptk.config.schema import ModelConfig
from mptk.config.shape import Embedding, Head, Shape

__all__ = [
    "cp_alltoall_bytes", "local_sequence",
    "Embedding", "Head", "Shape", "Tensors", "embedding_flops", "hardware_flops", "head_bytes",
    "dropout_masks", "head_flops", "korthikanti", "largest_layer", "layer_activations", "layer_flops",
    "layer_forward", "layer_matmul_params", "layer_tensors", "logits", "loss_flops",
    "megatron_flops", "model_flops", "numel", "output_flops", "param_groups",
    "recompute_transient", "recomputed_layers", "shape_of", "stage_activations", "stage_flops",
    "stage_tensors", "tensor_count", "total_params",
]


def shape_of(model: ModelConfig) -> Shape:
    """The :class:`Shape` the model's recipe states for this config."""
    return registry.get(model.recipe).shape(model)


# --------------------------------------------------------------------------- parameters

Tensors = Counter
"""``{(numel, is_matrix): count}``: the parameter tensors one rank holds (mptk puts
matrices in the weight-decay group and vectors in the other, :func:`param_groups`)."""


def _norm(s: Shape) -> list[tuple[int, bool]]:
    return [(s.hidden, False)] if s.rms else [(s.hidden, False), (s.hidden, False)]


def layer_tensors(s: Shape, tp: int) -> list[tuple[int, bool]]:
    """One megatron transformer layer (local spec, biases on) on one tp rank."""
    h, d = s.hidden, s.hidden // s.heads
    qkv = (s.heads + 2 * s.kv_heads) * d // tp
    fc1 = s.ffn * (2 if s.gated else 1) // tp
    return [*_norm(s), (qkv * h, True), (qkv, False), (h * h // tp, True), (h, False),
            *_norm(s), (fc1 * h, True), (fc1, False), (h * s.ffn // tp, True), (h, False)]


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


def stage_tensors(s: Shape, tp: int, layers: int, first: bool, last: bool, pp: int = 1) -> Tensors:
    """Parameter tensors of one rank holding ``layers`` layers (and the ends it owns)."""
    counts = Counter((_embedding_tensors(s, tp) if first else [])
                     + (_head_tensors(s, tp, first, pp) if last else []))
    for key, n in Counter(layer_tensors(s, tp)).items():
        counts[key] += n * layers
    return counts


def total_params(s: Shape) -> int:
    """Parameters of the whole model (tp=1, pp=1)."""
    return numel(stage_tensors(s, 1, s.layers, True, True))


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


def largest_layer(s: Shape, tp: int) -> int:
    """Elements of one layer on one tp rank (what ZeRO-3 gathers at a time)."""
    return sum(n for n, _ in layer_tensors(s, tp))


# --------------------------------------------------------------------------- FLOPs


def megatron_flops(batch: int, s: int, l: int, h: int, v: int) -> float:  # noqa: E741 (the paper's symbols)
    """Model FLOPs per step (Korthikanti et al. 2022): 72 B s l h^2 (1 + s/(6h) + V/(12 l h))."""
    return 72 * batch * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


def layer_matmul_params(s: Shape) -> int:
    """Matrix elements of one layer (tp=1): qkv, projection, MLP."""
    return sum(n for n, matrix in layer_tensors(s, 1) if matrix)


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
    return korthikanti(s.seq, micro, s.hidden, s.heads, tp, sp, mode) * (w / 2) + masks * (mask - w / 2)


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


def head_bytes(s: Shape, micro: int, tp: int, sp: bool = False, w: int = 2) -> float:
    """Last stage, saved for backward: the fp32 logits (megatron's vocab-parallel cross-entropy
    computes the softmax in place, so one 4-byte tensor per logit / tp) and three hidden-sized
    tensors at the ends (embedding dropout, final norm input, output layer input; /tp with
    sequence parallelism). Measured on the CPU by ``bench/memory_levers.py``."""
    positions, outputs = logits(s)
    ends = 3 * s.seq * micro * s.hidden * w / (tp if sp else 1)
    return 4 * positions * micro * outputs / tp + ends
