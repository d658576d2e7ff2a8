"""The GPT recipe: config schema, model builder, batch -> loss, and data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel

from mptk.config.schema import ModelConfig, PositionEmbedding, RunConfig
from mptk.models import megatron, registry


@dataclass(kw_only=True, slots=True)
class GPTConfig(ModelConfig):
    """A decoder-only language model (megatron-core ``GPTModel``)."""

    recipe: str = "gpt"
    vocab_size: int = 4096
    """Vocabulary size; the default tokenizer is trained to this size."""
    position_embedding: PositionEmbedding = PositionEmbedding.learned_absolute
    """Learned absolute positions or rotary embeddings."""
    tie_embeddings: bool = True
    """Share the input embedding and output layer weights."""


def build(cfg: GPTConfig, ctx: registry.ModelContext) -> GPTModel:
    """This stage's part of the GPT (the whole model at pp=1)."""
    return GPTModel(
        config=megatron.transformer_config(cfg, ctx.tp, ctx.pp, ctx.dtype),
        transformer_layer_spec=megatron.layer_spec(cfg),
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
        pre_process=ctx.pre_process, post_process=ctx.post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding.value,
    )


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """megatron's convention: True where attention is blocked. Passed explicitly because
    megatron's fallback builds it on CUDA; SDPA ignores it and uses its causal kernel."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device),
                      diagonal=1)[None, None]


def loss(model: GPTModel, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the micro-batch."""
    tokens, labels = batch["tokens"], batch["labels"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    per_token = model(tokens, positions, causal_mask(tokens.shape[1], tokens.device),
                      labels=labels)
    value = per_token.float().mean()
    return value, {"tokens": tokens.numel()}


def data(cfg: RunConfig, layout, log=print):
    """Token data for this run (the tokenizer is trained to ``model.vocab_size``)."""
    from mptk.data.source import TokenData

    return TokenData.prepare(cfg, layout, cfg.model.vocab_size, log=log)


def checks(cfg: RunConfig) -> list[str]:
    """GPT-specific preflight lines."""
    problems = []
    if cfg.model.vocab_size < 260 and cfg.data.source.value in ("stdlib", "files"):
        problems.append(f"model.vocab_size({cfg.model.vocab_size}) < 260: a byte-level BPE "
                        f"needs 256 bytes + specials; use model.vocab_size>=512")
    return problems


RECIPE = registry.register(registry.Recipe(
    name="gpt", config=GPTConfig, build=build, loss=loss, data=data, checks=checks,
    units="tokens"))
