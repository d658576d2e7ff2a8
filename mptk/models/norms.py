"""A norm for the local (no apex / Transformer Engine) layer spec that works with sequence
parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``config.sequence_parallel``: under sequence
parallelism each tensor-parallel rank normalises only its slice of the sequence, so the norm's
weight and bias gradients are partial sums that must be added over the tp group. apex's norm
marks such parameters ``sequence_parallel=True`` and megatron's ``finalize_model_grads`` sums
them; mptk lets DeepSpeed own the gradient reduction, so :mod:`mptk.engine.grads` does that sum
for every parameter marked here.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelNorm:
    """``LayerNorm`` or ``RMSNorm`` (``config.normalization``) whose parameters carry
    ``sequence_parallel`` when the config runs sequence parallelism; a spec drop-in for
    megatron's ``WrappedTorchNorm`` (a class with the same constructor: megatron's
    ``build_module`` instantiates classes but returns plain functions uncalled)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int,  # type: ignore[misc]
                eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization {config.normalization!r}: use LayerNorm or RMSNorm")
        norm = _NORMS[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
