"""The one place where mptk's model config becomes megatron-core's ``TransformerConfig``,
and where layer specs are chosen (the attention implementation is swapped through the spec).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from mptk.config.schema import Activation, AttentionImpl, DType, ModelConfig, Recompute, RecomputeMethod
from mptk.models.attention import SdpaAttention
from mptk.models.init import megatron_init
from mptk.models.norms import SequenceParallelNorm
from mptk.plan import partition

_DTYPES = {DType.fp32: torch.float32, DType.bf16: torch.bfloat16, DType.fp16: torch.float16}


_ACTIVATIONS = {Activation.gelu: F.gelu, Activation.swiglu: F.silu,
                Activation.gelu_tanh: functools.partial(F.gelu, approximate="tanh")}
"""The MLP's activation (SwiGLU: megatron's gated unit around SiLU)."""


def torch_dtype(dtype: DType) -> torch.dtype:
    return _DTYPES[dtype]


def transformer_config(model: ModelConfig, tp: int, pp: int, dtype: DType, *,
                       stage_layers: Optional[list[int]] = None,
                       batch_p2p: bool = True, sp: bool = False,
                       recompute: Recompute = Recompute.none,
                       recompute_method: RecomputeMethod = RecomputeMethod.uniform,
                       recompute_layers: int = 1) -> TransformerConfig:
    """mptk model + layout + dtype -> megatron ``TransformerConfig``.

    Fusions that need apex/TE/CUDA kernels are off. Inside ``init.deferred()`` (the trainer's
    build) megatron's init methods draw nothing (it still sets its tp attributes) and
    :func:`mptk.models.init.initialise` sets every weight from the seed and its global
    identity (the same at every layout); elsewhere megatron initialises on the CPU (full
    matrices, then split over tp).
    ``stage_layers`` (pp>1) becomes megatron's pipeline layout; ``batch_p2p=False`` sends
    pipeline tensors one by one (required on gloo: batched p2p gave silently wrong gradients
    with the interleaved schedule at pp=2). ``sp`` is megatron's ``sequence_parallel``;
    ``recompute*`` become its ``recompute_granularity`` / ``recompute_method`` /
    ``recompute_num_layers`` (selective recomputes core attention only).
    """
    swiglu = model.activation is Activation.swiglu
    layout = partition.megatron_layout(stage_layers) if pp > 1 and stage_layers else None
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn_hidden_size,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std, normalization=model.normalization.value,
        gated_linear_unit=swiglu, activation_func=_ACTIVATIONS[model.activation],
        add_bias_linear=model.bias, layernorm_epsilon=model.norm_epsilon,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=torch_dtype(dtype), pipeline_dtype=torch_dtype(dtype),
        bf16=dtype is DType.bf16, fp16=dtype is DType.fp16,
        use_cpu_initialization=True, perform_initialization=True, **megatron_init(),
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        pipeline_model_parallel_layout=layout, batch_p2p_comm=batch_p2p,
        sequence_parallel=sp, **_recompute(recompute, recompute_method, recompute_layers),
        context_parallel_size=_cp_size(), **_moe(model),
    )


def _cp_size() -> int:
    """megatron's modules take their cp group from parallel_state (GPTModel's RoPE picks this
    rank's two load-balanced chunks from it, and the schedule sizes p2p buffers by
    ``context_parallel_size``), so the config must state the same degree. megatron's own cp
    attention path (TE-only ``DotProductAttention``) is never built: at cp>1 the spec's core
    attention is mptk's Ulysses one (preflight refuses ``model.attention=local`` there)."""
    from mptk.parallel import groups

    return groups.cp_size()


def _moe(model: ModelConfig) -> dict[str, Any]:
    """Mixture-of-Experts fields (none for a dense model). Expert parallelism is megatron's
    ``expert_model_parallel_size`` from parallel_state (its groups must exist first). The
    alltoall dispatcher with permute/router fusions and grouped GEMM off: those need TE."""
    if not model.num_experts:
        return {}
    from mptk.parallel import groups

    return {"num_moe_experts": model.num_experts, "moe_router_topk": model.moe_topk,
            "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size
            or 4 * model.hidden_size,
            "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_expert_capacity_factor": model.moe_capacity_factor,
            "moe_pad_expert_input_to_capacity": False,
            "moe_shared_expert_intermediate_size": model.moe_shared_expert_hidden_size,
            "moe_token_dispatcher_type": "alltoall", "moe_grouped_gemm": False,
            "moe_permute_fusion": False, "moe_router_fusion": False,
            "expert_model_parallel_size": groups.ep_size()}


def _recompute(how: Recompute, method: RecomputeMethod, layers: int) -> dict[str, Any]:
    if how is Recompute.none:
        return {}
    if how is Recompute.selective:
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": method.value,
            "recompute_num_layers": layers}


def config_for(model: ModelConfig, ctx) -> TransformerConfig:
    """``transformer_config`` for the rank described by a ``registry.ModelContext``."""
    return transformer_config(model, ctx.tp, ctx.pp, ctx.dtype, stage_layers=ctx.stage_layers,
                              batch_p2p=ctx.batch_p2p, sp=ctx.sp, recompute=ctx.recompute,
                              recompute_method=ctx.recompute_method,
                              recompute_layers=ctx.recompute_layers)


def layer_spec(model: ModelConfig, mask: AttnMaskType = AttnMaskType.causal,
               sp: bool = False) -> ModuleSpec:
    """megatron's local (no-TE) layer spec, with core attention and mask type swapped in (and,
    under sequence parallelism, norms that allow it)."""
    spec = get_gpt_layer_local_spec(normalization=model.normalization.value,
                                    num_experts=model.num_experts or None,
                                    moe_grouped_gemm=False)
    if sp:
        spec.submodules.input_layernorm = SequenceParallelNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    attention = spec.submodules.self_attention
    if model.attention is AttentionImpl.sdpa:
        attention.submodules.core_attention = SdpaAttention
        if _cp_size() > 1:
            from mptk.models.context import UlyssesAttention

            attention.submodules.core_attention = UlyssesAttention
    attention.params = {**attention.params, "attn_mask_type": mask}
    return spec


def block_spec(config: TransformerConfig, layer: ModuleSpec, vp_stage: Optional[int]) -> ModuleSpec:
    """This stage's decoder block: ``layer`` for each of its layers and, as the final norm,
    :class:`SequenceParallelNorm` (megatron's default block norm refuses sequence parallelism)."""
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * count, layer_norm=SequenceParallelNorm))


def replace(config: TransformerConfig, **changes) -> TransformerConfig:
    """A copy of ``config`` with ``changes`` (recipes use this for variants)."""
    return dataclasses.replace(config, **changes)
