"""The GPT recipe: config schema, model builder, batch -> loss, and data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mptk.config import registry
from mptk.config.schema import ModelConfig, PositionEmbedding, RunConfig
from mptk.config.shape import Embedding, Head, Shape, transformer

if TYPE_CHECKING:  # torch and megatron load with the model, not with the config (mptk-plan)
    import torch
    from megatron.core.models.gpt import GPTModel


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
    rotary_base: float = 10000.0
    """RoPE's base period theta (``position_embedding=rope``; Hugging Face's ``rope_theta``)."""


def build(cfg: GPTConfig, ctx: registry.ModelContext) -> GPTModel:
    """This stage's part of the GPT (the whole model at pp=1)."""
    from megatron.core.models.gpt import GPTModel

    from mptk.models import megatron

    config = megatron.config_for(cfg, ctx)
    spec = megatron.layer_spec(cfg, sp=ctx.sp)
    return GPTModel(
        config=config,
        transformer_layer_spec=megatron.block_spec(config, spec, ctx.vp_stage) if ctx.sp else spec,
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
        pre_process=ctx.pre_process, post_process=ctx.post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding.value, vp_stage=ctx.vp_stage,
        rotary_base=cfg.rotary_base,  # type: ignore[arg-type]  # megatron annotates int
    )


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """megatron's convention: True where attention is blocked. Passed explicitly because
    megatron's fallback builds it on CUDA; SDPA ignores it and uses its causal kernel."""
    import torch

    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device),
                      diagonal=1)[None, None]


def forward(model: GPTModel, batch: dict):
    """This stage's output (per-token losses on the last stage) and the function reducing it
    to ``(loss, metrics)`` — the pipeline schedule calls the latter on the last stage only."""
    import torch

    tokens, labels = batch["tokens"], batch["labels"]
    positions = batch.get("positions")  # a cp rank's tokens are not 0..s-1 (data Place.cut)
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = model(tokens, positions, causal_mask(tokens.shape[1], tokens.device), labels=labels)
    return output, lambda per_token: (per_token.float().mean(), {"tokens": tokens.numel()})


def loss(model: GPTModel, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the micro-batch."""
    output, reduce = forward(model, batch)
    return reduce(output)


def data(cfg: RunConfig, layout, log=print):
    """Token data for this run: megatron indexed datasets, from ``data.blend`` or from the text
    source tokenized once into the cache (the tokenizer is trained to ``model.vocab_size``)."""
    from mptk.data.indexed import IndexedData

    return IndexedData.prepare(cfg, layout, cfg.model.vocab_size, log=log)


def checks(cfg: RunConfig) -> list[str]:
    """GPT-specific preflight lines."""
    problems = []
    source = cfg.data.source.value
    if source in ("digits", "image_folder"):
        problems.append(f"data.source={source} holds images; the GPT recipe needs text: use "
                        f"data=stdlib, data.source=files or data=indexed")
    trains_bpe = source in ("stdlib", "files") or (source == "indexed" and not cfg.data.blend)
    if cfg.model.vocab_size < 260 and trains_bpe:
        problems.append(f"model.vocab_size({cfg.model.vocab_size}) < 260: a byte-level BPE "
                        f"needs 256 bytes + specials; use model.vocab_size>=512")
    if source == "indexed":
        from mptk.data import blend

        problems += blend.problems(cfg.data.blend, cfg.data.split, cfg.model.vocab_size)
    return problems


def shape(cfg: GPTConfig) -> Shape:
    """The cost model's view: a token embedding (learned positions or RoPE) and an LM head,
    tied or not."""
    return transformer(cfg, vocab=cfg.vocab_size, tied=cfg.tie_embeddings,
                       learned_pos=cfg.position_embedding is PositionEmbedding.learned_absolute,
                       embedding=Embedding.tokens, head=Head.lm)


def example_batch(cfg: GPTConfig, micro: int, generator: torch.Generator) -> dict:
    """Random token ids of the model's vocabulary and sequence length."""
    import torch

    tokens = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_length + 1), generator=generator)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


RECIPE = registry.register(registry.Recipe(
    name="gpt", config=GPTConfig, build=build, loss=loss, forward=forward, data=data, checks=checks,
    units="tokens", shape=shape, example_batch=example_batch))
