"""The one place where mptk's model config becomes megatron-core's ``TransformerConfig``,
and where layer specs are chosen (the attention implementation is swapped through the spec).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mptk.config.schema import Activation, AttentionImpl, DType, ModelConfig
from mptk.models.attention import SdpaAttention
from mptk.plan import partition

_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}


def torch_dtype(dtype: DType) -> torch.dtype:
    return _DTYPES[dtype]


def transformer_config(model: ModelConfig, tp: int, pp: int, dtype: DType, *,
                       stage_layers: Optional[list[int]] = None,
                       batch_p2p: bool = True) -> TransformerConfig:
    """mptk model + layout + dtype -> megatron ``TransformerConfig``.

    Fusions that need apex/TE/CUDA kernels are off; weights are initialised on the CPU as
    full matrices and then split, so every tp layout starts from the same weights.
    ``stage_layers`` (pp>1) becomes megatron's pipeline layout; ``batch_p2p=False`` sends
    pipeline tensors one by one (required on gloo: batched p2p gave silently wrong gradients
    with the interleaved schedule at pp=2).
    """
    swiglu = model.activation is Activation.swiglu
    layout = partition.megatron_layout(stage_layers) if pp > 1 and stage_layers else None
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn_hidden_size,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std, normalization=model.normalization.value,
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=torch_dtype(dtype), pipeline_dtype=torch_dtype(dtype),
        bf16=dtype is DType.bf16, fp16=dtype is DType.fp16,
        use_cpu_initialization=True, perform_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        pipeline_model_parallel_layout=layout, batch_p2p_comm=batch_p2p,
    )


def config_for(model: ModelConfig, ctx) -> TransformerConfig:
    """``transformer_config`` for the rank described by a ``registry.ModelContext``."""
    return transformer_config(model, ctx.tp, ctx.pp, ctx.dtype, stage_layers=ctx.stage_layers,
                              batch_p2p=ctx.batch_p2p)


def layer_spec(model: ModelConfig, mask: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    """megatron's local (no-TE) layer spec, with core attention and mask type swapped in."""
    spec = get_gpt_layer_local_spec(normalization=model.normalization.value)
    attention = spec.submodules.self_attention
    if model.attention is AttentionImpl.sdpa:
        attention.submodules.core_attention = SdpaAttention
    attention.params = {**attention.params, "attn_mask_type": mask}
    return spec


def replace(config: TransformerConfig, **changes) -> TransformerConfig:
    """A copy of ``config`` with ``changes`` (recipes use this for variants)."""
    return dataclasses.replace(config, **changes)
