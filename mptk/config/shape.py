"""What a recipe's model looks like to the cost model: the transformer's dimensions and its ends.

A plain description, no arithmetic: :mod:`mptk.plan.cost` turns it into parameters, FLOPs and
activation bytes. Each recipe states its own (``Recipe.shape``), so no library code needs to know
a recipe by name. It lives in ``config`` (below ``plan``) so that the registry can type the
field; :func:`transformer` fills the dimensions every :class:`ModelConfig` has.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from mptk.config.schema import Activation, AttentionImpl, ModelConfig, Normalization


class Embedding(Enum):
    """What the first pipeline stage runs before the first transformer layer."""

    tokens = "tokens"
    """A vocabulary-parallel token table (``vocab x hidden``), plus learned positions if any."""
    patches = "patches"
    """A patch embedding as megatron's ``CLIPViTModel`` builds it: a bias-free linear of
    ``patch_inputs`` (channels x patch x patch) inputs, learned positions, a class token and
    ``ln_pre``."""
    none = "none"
    """Nothing (a recipe that only states its transformer layers)."""


class Head(Enum):
    """What the last pipeline stage runs after the last transformer layer."""

    lm = "lm"
    """Final norm and an output layer over the vocabulary at every position (tied to the token
    table unless ``tied`` is false), then softmax cross-entropy."""
    classes = "classes"
    """Final norm and a linear of ``classes`` outputs on the class token, then the loss."""
    none = "none"
    """Nothing."""


@dataclass(frozen=True, slots=True)
class Shape:
    """The model dimensions the planner, stage balancing and FLOP/s logging need."""

    recipe: str
    """A label for messages; nothing branches on it."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    seq: int
    """Positions each layer runs (ViT: patches + the class token)."""
    vocab: int = 0
    """Vocabulary of a token embedding or LM head (0 without one)."""
    gated: bool = False
    """SwiGLU: fc1 is twice as wide."""
    rms: bool = False
    """RMSNorm (one weight) instead of LayerNorm (weight and bias)."""
    bias: bool = True
    """Biases on the layers' linears (qkv, projection, fc1, fc2: ``model.bias``)."""
    learned_pos: bool = True
    tied: bool = True
    """The LM head shares the token table (at pp>1 the last stage still keeps a copy)."""
    flash: bool = True
    """SDPA attention: the s x s score matrix is not kept for backward."""
    embedding: Embedding = Embedding.tokens
    head: Head = Head.lm
    patch_inputs: int = 0
    """``Embedding.patches``: inputs of one patch (channels x patch_size**2)."""
    classes: int = 0
    """``Head.classes``: outputs of the class head."""


def transformer(model: ModelConfig, **ends: Any) -> Shape:
    """A :class:`Shape` from the fields every model config has (layers, widths, heads,
    ``seq_length``, norm, activation, attention); ``ends`` sets or overrides the rest (``seq``,
    ``vocab``, ``embedding``, ``head``, ...). Without ``ends`` the model is its transformer
    layers alone: the default for a recipe that states no shape."""
    fields: dict[str, Any] = dict(
        recipe=model.recipe, layers=model.num_layers, hidden=model.hidden_size,
        heads=model.num_attention_heads,
        kv_heads=model.num_query_groups or model.num_attention_heads,
        ffn=model.ffn_hidden_size or 4 * model.hidden_size, seq=model.seq_length,
        gated=model.activation is Activation.swiglu, rms=model.normalization is Normalization.RMSNorm,
        bias=model.bias,
        learned_pos=False, tied=False, flash=model.attention is AttentionImpl.sdpa,
        embedding=Embedding.none, head=Head.none)
    return Shape(**(fields | ends))
