"""Context parallelism: DeepSpeed-Ulysses all-to-all around mptk's SDPA core attention.

Each cp rank holds ``seq / cp`` tokens of every sequence (megatron's load-balanced chunks,
:func:`mptk.parallel.layout.cp_chunks`) and all of its tp rank's heads. Before attention one
all-to-all trades that for the *whole* sequence and ``heads / cp`` of the heads; the gathered
sequence is put back into natural order so a plain causal SDPA is exact; after attention the
inverse reorder and all-to-all return to the rank's own tokens and all heads. Everything
outside core attention (projections, MLP, norms, loss) is per token and needs no change.

megatron-core's own context parallelism lives in ``DotProductAttention`` and asserts Transformer
Engine, so this module replaces core attention through the layer spec instead.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mptk.models.attention import SdpaAttention
from mptk.parallel import groups
from mptk.parallel.layout import cp_positions


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Block ``i`` of dim 0 goes to cp rank ``i``; block ``i`` of the result came from it."""
    x = x.contiguous()  # before empty_like, which would copy a permuted view's strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``[s/cp, b, h, d]`` (own tokens, all heads) -> ``[s, b, h/cp, d]`` (cp-rank order)."""
    cp = group.size()
    s, b, h, d = x.shape
    blocks = x.reshape(s, b, cp, h // cp, d).permute(2, 0, 1, 3, 4)  # [cp, s/cp, b, h/cp, d]
    return _all_to_all(blocks, group).reshape(cp * s, b, h // cp, d)


def _heads_to_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    cp = group.size()
    total, b, hc, d = x.shape
    blocks = _all_to_all(x.reshape(cp, total // cp, b, hc, d), group)  # [cp, s/cp, b, h/cp, d]
    return blocks.permute(1, 2, 0, 3, 4).reshape(total // cp, b, cp * hc, d)


class Redistribute(torch.autograd.Function):
    """:func:`_seq_to_heads` (``to_heads``) or :func:`_heads_to_seq`; each one's gradient is
    the other all-to-all."""

    @staticmethod
    def forward(ctx, x, group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group), None, None


def gathered_order(seq_length: int, cp: int) -> torch.Tensor:
    """Position of each row of the gathered sequence (cp rank 0's tokens, then rank 1's...)."""
    return torch.tensor([p for r in range(cp) for p in cp_positions(seq_length, cp, r)])


class UlyssesAttention(SdpaAttention):
    """SDPA core attention over the whole sequence with ``heads / cp`` heads per rank.

    Same constructor and forward as :class:`SdpaAttention` (a drop-in in the layer spec).
    Explicit masks are refused: only causal or unmasked attention is split exactly.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         pg_collection=pg_collection)
        self.cp_group = pg_collection.cp if pg_collection is not None else groups.cp_group()
        cp = self.cp_group.size()
        if self.heads % cp or self.groups % cp:
            raise ValueError(f"heads({self.heads})/tp and query groups({self.groups})/tp must "
                             f"be divisible by cp({cp})")
        self._orders: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _order(self, seq_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gathered -> natural, natural -> gathered) row indices, cached per length."""
        key = (seq_length, str(device))
        if key not in self._orders:
            order = gathered_order(seq_length, self.cp_group.size())
            self._orders[key] = (torch.argsort(order).to(device), order.to(device))
        return self._orders[key]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type != AttnMaskType.causal and attention_mask is not None:
            raise ValueError("context parallelism splits causal or unmasked attention only")
        q, k, v = (Redistribute.apply(t, self.cp_group, True) for t in (query, key, value))
        to_natural, to_gathered = self._order(q.shape[0], q.device)
        q, k, v = (t.index_select(0, to_natural) for t in (q, k, v))
        out = self.attend(q, k, v, None, mask_type).index_select(0, to_gathered)
        out = Redistribute.apply(out, self.cp_group, False)
        return out.reshape(out.shape[0], out.shape[1], self.hidden_per_partition)
