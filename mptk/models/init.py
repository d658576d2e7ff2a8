"""Layout-invariant initialisation: every parameter's first value is a function of the seed and
its global identity, so tp, pp, vpp, uneven stages and dp (and any future cp or ep) all start
from the weights of the one-process model.

A parameter's global identity is what megatron's dist-checkpointing already knows: the
``ShardedTensor`` entries of the model chunk's ``sharded_state_dict`` name the full tensor
(``key``), the global layer (and expert) number along prepended axes, and where this rank's
slice sits in the full tensor -- fused QKV and SwiGLU's ``[gate; up]`` halves included (megatron
describes each tp rank's ``[gate_i; up_i]`` as two slices of the tp=1 tensor). The values of a
full tensor are drawn in fixed blocks of rows, each from its own generator seeded by
``hash(seed, key, layer, block)``; a rank draws only the blocks its slice touches, one block at
a time, so no rank holds more than its own parameters plus one block.

The scheme is megatron's: linear weights and embeddings ``normal(0, init_method_std)``, the
layers writing into the residual stream (``linear_proj``, ``linear_fc2``) scaled by
``1/sqrt(2 * num_layers)``, biases 0, norm weights 1. Plain torch modules a recipe adds (a ViT's
patch convolution, class token, position table, head) keep torch's default distributions.

:func:`deferred` makes megatron's init methods draw nothing while the trainer builds a
model (:func:`megatron_init`); :func:`initialise` then sets every parameter. Outside it (a recipe's ``build``
called directly) megatron initialises as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

BLOCK_ELEMENTS = 1 << 22
"""Elements drawn per generator (a block of whole rows of the full tensor; 16 MiB in fp32)."""

_OUTPUT_LAYERS = ("linear_proj", "linear_fc2")
"""Modules writing into the residual stream: megatron's ``output_layer_init_method``."""

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("mptk_init_deferred", default=False)


class Dist(Enum):
    """How a parameter's values are drawn."""

    const = "const"
    normal = "normal"
    uniform = "uniform"


@dataclass(frozen=True, slots=True)
class Rule:
    """One parameter's initial distribution."""

    dist: Dist
    """Constant, normal(0, scale) or uniform(-scale, scale)."""
    scale: float
    """The constant, the standard deviation or the bound."""


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Models built inside skip megatron's own initialisation (:func:`initialise` follows)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def deferring() -> bool:
    """True inside :func:`deferred`."""
    return _DEFERRED.get()


def megatron_init() -> dict[str, Any]:
    """``TransformerConfig`` fields for the build: inside :func:`deferred`, init methods that
    draw nothing. megatron's ``perform_initialization=False`` would also skip setting the
    weights' ``tensor_model_parallel`` / ``partition_dim`` attributes, which gradient norms
    and checkpoints read; a no-op method keeps those and the (cheap) zeroed biases."""
    if not deferring():
        return {}
    return {"init_method": _draw_nothing, "output_layer_init_method": _draw_nothing,
            "embedding_init_method": _draw_nothing}


def _draw_nothing(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def initialise(chunks: Sequence[torch.nn.Module], seed: int) -> None:
    """Set every parameter of this rank's model chunks from ``seed`` and its global identity.
    A chunk without megatron's ``sharded_state_dict`` (a recipe's plain torch model, which runs
    at tp = pp = 1) keeps the initialisation torch gave it when built."""
    with torch.no_grad():
        for chunk in chunks:
            if hasattr(chunk, "sharded_state_dict"):
                _initialise_chunk(chunk, seed)


def _initialise_chunk(chunk: torch.nn.Module, seed: int) -> None:
    rules = parameter_rules(chunk)
    owners = {_storage(p): p for p in chunk.parameters()}
    done: set[int] = set()
    for shard in sharded_tensors(chunk):
        param = owners.get(_storage(shard.data))
        if param is None:  # a buffer
            continue
        fill(shard, rules[id(param)], seed)
        done.add(id(param))
    missing = [n for n, p in chunk.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"init: parameters without a sharded_state_dict entry (no global "
                           f"identity to seed them from): {', '.join(missing)}")


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def sharded_tensors(chunk: torch.nn.Module) -> list:
    """The chunk's ``ShardedTensor`` entries, factories (SwiGLU's fc1 halves) built into views
    of the parameters they describe."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: list = []
    for entry in chunk.sharded_state_dict(metadata={}).values():  # type: ignore[operator]
        if isinstance(entry, ShardedTensorFactory):
            built = entry.build()
            out += list(built.values()) if isinstance(built, dict) else list(built)
        elif isinstance(entry, ShardedTensor):
            out.append(entry)
    return [s for s in out if isinstance(s, ShardedTensor)]


def parameter_rules(chunk: torch.nn.Module) -> dict[int, Rule]:
    """``id(param) -> Rule`` for every parameter of ``chunk`` (megatron's scheme)."""
    config = getattr(chunk, "config", None)
    std = float(getattr(config, "init_method_std", 0.02))
    emb_std = float(getattr(config, "embedding_init_method_std", None) or std)
    layers = int(getattr(config, "num_layers", 1))
    rules: dict[int, Rule] = {}
    for parent_name, parent in chunk.named_modules():
        for child_name, module in parent.named_children():
            in_embedding = type(parent).__name__ == "LanguageModelEmbedding"
            for name, param in module.named_parameters(recurse=False):
                rules[id(param)] = _rule(module, child_name, name, param, in_embedding,
                                         std, emb_std, layers)
        if parent_name == "":
            for name, param in parent.named_parameters(recurse=False):
                rules[id(param)] = _rule(parent, "", name, param, False, std, emb_std, layers)
    return rules


def _rule(module: torch.nn.Module, attr: str, name: str, param: torch.Tensor,
          in_embedding: bool, std: float, emb_std: float, layers: int) -> Rule:
    """One parameter's rule from its module's type and its place in the model."""
    kind = type(module).__name__
    if "Norm" in kind:
        return Rule(Dist.const, 1.0 if name == "weight" else 0.0)
    if name == "bias":
        return Rule(Dist.const, 0.0)
    if in_embedding or kind == "VocabParallelEmbedding":
        return Rule(Dist.normal, emb_std)
    if type(module).__module__.startswith("megatron.") and name != "class_token":
        scaled = attr in _OUTPUT_LAYERS
        return Rule(Dist.normal, std / math.sqrt(2.0 * layers) if scaled else std)
    if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
        fan_in = math.prod(param.shape[1:])  # replicated: the local tensor is the full one
        return Rule(Dist.uniform, 1.0 / math.sqrt(fan_in))  # torch's kaiming_uniform(a=sqrt(5))
    return Rule(Dist.normal, 1.0)  # torch.nn.Embedding's and torch.randn's default


def fill(shard, rule: Rule, seed: int) -> None:
    """This rank's slice of the full tensor ``shard`` describes, drawn block by block."""
    data = shard.data
    if rule.dist is Dist.const:
        data.fill_(rule.scale)
        return
    lead = shard.prepend_axis_num
    ident = (shard.key, *shard.global_offset[:lead])
    full = tuple(shard.global_shape[lead:])
    offset = tuple(shard.global_offset[lead:])
    data.copy_(draw(rule, seed, ident, full, offset, tuple(data.shape)))


def draw(rule: Rule, seed: int, ident: tuple, full: tuple[int, ...],
         offset: tuple[int, ...], local: tuple[int, ...]) -> torch.Tensor:
    """Rows ``offset[0]:offset[0]+local[0]`` (and the matching columns) of the full tensor
    ``ident`` of shape ``full``: the same numbers whatever slice is asked for."""
    row = math.prod(full[1:])
    block = max(1, BLOCK_ELEMENTS // max(row, 1))
    start, stop = offset[0], offset[0] + local[0]
    inner = tuple(slice(o, o + n) for o, n in zip(offset[1:], local[1:]))
    out = torch.empty(local, dtype=torch.float32)
    for b in range(start // block, -(-stop // block)):
        lo, hi = b * block, min(full[0], (b + 1) * block)
        values = _block(rule, _seed(seed, ident, b), (hi - lo, *full[1:]))
        take = slice(max(lo, start) - lo, min(hi, stop) - lo)
        out[max(lo, start) - start:min(hi, stop) - start] = values[(take, *inner)]
    return out


def _block(rule: Rule, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.empty(shape, dtype=torch.float32)
    if rule.dist is Dist.normal:
        return values.normal_(0.0, rule.scale, generator=gen)
    return values.uniform_(-rule.scale, rule.scale, generator=gen)


def _seed(seed: int, ident: tuple, block: int) -> int:
    """A 63-bit seed from the run's seed, the tensor's global identity and the block index."""
    text = "/".join(str(x) for x in (seed, *ident, block))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
