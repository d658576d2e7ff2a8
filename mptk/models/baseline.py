"""A GPT in plain PyTorch: the GPT recipe's shape (:class:`mptk.recipes.gpt.recipe.GPTConfig`)
as a self-contained ``nn.Module`` with causal SDPA attention, the baseline ``mptk-bench``
measures mptk's own path against (:mod:`mptk.launch.bench`).

Megatron-core's defaults: pre-norm layers with biases, LayerNorm or RMSNorm, GELU or SwiGLU,
grouped-query attention when asked, RoPE (non-interleaved, base 10000) or learned positions,
a tied or untied output layer; the same parameter count as megatron's ``GPTModel``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(seq: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[seq, head_dim]`` of rotary embeddings (base 10000, halves rotated, as
    megatron-core's non-interleaved RoPE)."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``t``: ``[b, s, heads, d]``."""
    t1, t2 = t.chunk(2, dim=-1)
    rotated = torch.cat((-t2, t1), dim=-1)
    return t * cos[:, None].to(t.dtype) + rotated * sin[:, None].to(t.dtype)


class Block(nn.Module):
    """Pre-norm transformer layer with megatron's defaults: biases (unless model.bias=false),
    LayerNorm/RMSNorm, GELU or SwiGLU, causal SDPA, grouped-query attention when asked."""

    def __init__(self, m):
        super().__init__()
        h, heads = m.hidden_size, m.num_attention_heads
        self.heads, self.groups, self.d = heads, m.num_query_groups or heads, h // heads
        ffn, self.swiglu = m.ffn_hidden_size or 4 * h, m.activation.value == "swiglu"
        norm = nn.RMSNorm if m.normalization.value == "RMSNorm" else nn.LayerNorm
        self.ln1, self.ln2 = norm(h), norm(h)
        bias = getattr(m, "bias", True)  # model.bias=false drops the linear biases, as megatron does
        self.qkv = nn.Linear(h, (heads + 2 * self.groups) * self.d, bias=bias)
        self.proj = nn.Linear(heads * self.d, h, bias=bias)
        self.fc1 = nn.Linear(h, ffn * (2 if self.swiglu else 1), bias=bias)
        self.fc2 = nn.Linear(ffn, h, bias=bias)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """``x``: ``[b, s, h]``; ``rope``: the (cos, sin) tables, or ``None``."""
        b, s, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(
            [self.heads * self.d, self.groups * self.d, self.groups * self.d], dim=-1)
        q, k, v = (t.view(b, s, -1, self.d) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, -1))
        hidden = self.fc1(self.ln2(x))
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return x + self.fc2(hidden)


class PlainGPT(nn.Module):
    """The GPT recipe's shape (:class:`mptk.recipes.gpt.recipe.GPTConfig`) in plain PyTorch;
    ``forward`` returns the mean next-token cross-entropy (computed in fp32)."""

    def __init__(self, m):
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        rope = m.position_embedding.value == "rope"
        self.pos = None if rope else nn.Embedding(m.seq_length, m.hidden_size)
        self.rope: tuple[torch.Tensor, ...] | None = rope_tables(
            m.seq_length, m.hidden_size // m.num_attention_heads) if rope else None
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        norm = nn.RMSNorm if m.normalization.value == "RMSNorm" else nn.LayerNorm
        self.ln_f = norm(m.hidden_size)
        self.head = None if m.tie_embeddings else nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=m.init_method_std)

    def to(self, *args, **kwargs):
        """``nn.Module.to``, the RoPE tables (plain tensors, not buffers) included."""
        if self.rope is not None:
            self.rope = tuple(t.to(*args, **kwargs) for t in self.rope)
        return super().to(*args, **kwargs)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``labels`` (``[b, s]``) given ``tokens`` (``[b, s]``)."""
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, self.rope)
        weight = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(self.ln_f(x), weight)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
