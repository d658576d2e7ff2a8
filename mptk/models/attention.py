"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's ``DotProductAttention`` in a layer spec (same constructor and
forward signature): PyTorch picks a flash / memory-efficient kernel on GPU and a fused one on
CPU, instead of megatron's baddbmm + softmax that materialises the scores.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SdpaAttention(MegatronModule):
    """Core attention on ``[s, b, heads, head_dim]`` tensors; causal or bidirectional."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_size()
        projection = config.kv_channels * config.num_attention_heads
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.hidden_per_partition = divide(projection, tp)
        head_dim = divide(projection, config.num_attention_heads)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        out = self.attend(query, key, value, attention_mask, attn_mask_type or self.attn_mask_type)
        return out.reshape(out.shape[0], out.shape[1], self.hidden_per_partition)

    def attend(self, query, key, value, attention_mask, mask_type):
        """SDPA on ``[s, b, heads, d]`` (any head counts in the query/group ratio) ->
        ``[s, b, heads, d]``."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> [b, h, s, d]
        with _dropout_rng(self.training and self.dropout > 0):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._mask(attention_mask, mask_type),
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask_type == AttnMaskType.causal, scale=self.scale,
                enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3)

    @staticmethod
    def _mask(attention_mask, mask_type):
        """megatron masks are True where attention is *blocked*; SDPA's bool masks the reverse."""
        if mask_type == AttnMaskType.causal or attention_mask is None:
            return None
        return ~attention_mask


def _dropout_rng(active: bool):
    """Dropout inside the TP region draws from megatron's tensor-parallel RNG stream."""
    if not active:
        return contextlib.nullcontext()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().fork()


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
