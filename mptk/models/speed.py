"""Speed options applied to a freshly built model, in one place.

:func:`apply` is called once by :func:`mptk.train.loop.build_model`, after the recipe built this
rank's model (or its pipeline chunks) and before anything else sees it (reference weights in
tests, ``init_from``, checkpoints, DeepSpeed). Each option is off by default and is proven on
the CPU to give the same losses as the plain path (``tests/spawn/test_speed.py``):

- parameters in the run's dtype (always, bf16/fp16 runs): megatron's local layer spec builds
  its norms as plain ``torch.nn.LayerNorm``/``RMSNorm`` in fp32 whatever ``params_dtype`` is; a
  bf16 megatron model outside DeepSpeed then fails on a GPU at the first linear layer
  (float/bfloat16 mismatch; megatron's cure is its ``Float16Module`` wrapper, which renames
  every parameter). DeepSpeed casts the parameters itself (not the buffers, e.g. rotary
  ``inv_freq``); doing the same cast here makes the model right as built, with the same
  numbers, and keeps parameter names and checkpoints unchanged.
- ``train.compile``: ``torch.compile`` of every megatron ``TransformerLayer`` in place
  (``nn.Module.compile``: the module, its parameter names and state dict stay the same, so
  checkpoints and DeepSpeed see the plain model). Layers share one compiled graph.
- ``train.compile_loss``: ``torch.compile`` of a GPT's cross-entropy over the logits.
"""

from __future__ import annotations

import os
import shutil

import torch

from mptk.config.schema import DType, RunConfig

_DTYPES = {DType.bf16: torch.bfloat16, DType.fp16: torch.float16}


def apply(chunks: list[torch.nn.Module], cfg: RunConfig) -> list[torch.nn.Module]:
    """The run's speed options on each model chunk (in place); returns ``chunks``."""
    for chunk in chunks:
        cast_params(chunk, cfg.train.dtype)
        if cfg.train.compile:
            compile_layers(chunk)
        if cfg.train.compile_loss:
            compile_loss(chunk)
    return chunks


def cast_params(model: torch.nn.Module, dtype: DType) -> int:
    """Floating parameters to the run's half dtype (buffers keep theirs, as with DeepSpeed);
    a no-op for fp32. Returns how many parameters changed dtype."""
    target = _DTYPES.get(dtype)
    changed = 0
    for param in model.parameters() if target is not None else ():
        if param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
            changed += 1
    return changed


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every megatron ``TransformerLayer`` in ``model`` (GPT and ViT blocks alike)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` each transformer layer in place; returns the number compiled.

    Raises ``ValueError`` with the fix when it cannot work: no transformer layer in the model,
    or no compiler for inductor on this device. Equal to eager on the CPU at dp=2 ZeRO-1 and
    tp=2 ZeRO-3 (``tests/spawn/test_speed.py``; ZeRO-3's hooks split the graph, but it runs) and,
    tried by hand, at pp=2.
    """
    compiler_problem = inductor_problem(next(model.parameters()).device)
    if compiler_problem:
        raise ValueError(f"train.compile=true: {compiler_problem}; or set train.compile=false")
    layers = transformer_layers(model)
    if not layers:
        raise ValueError("train.compile=true: this model has no megatron TransformerLayer to "
                         "compile; set train.compile=false")
    _allow_one_graph_per_layer(len(layers))
    _quiet_tp_group_lookup()
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_loss(model: torch.nn.Module) -> bool:
    """``train.compile_loss``: the last stage's cross-entropy over the logits (megatron's
    ``vocab_parallel_cross_entropy``, several fp32 passes over ``[s, b, vocab]``) as one compiled
    function, when the model is a megatron language model (GPT; the ViT has its own head). An
    instance attribute: the module, its parameters and state dict are unchanged. Returns whether
    this chunk had such a loss."""
    problem = inductor_problem(next(model.parameters()).device)
    if problem:
        raise ValueError(f"train.compile_loss=true: {problem}; or set train.compile_loss=false")
    language_model = hasattr(model, "compute_language_model_loss")
    if not (language_model and getattr(model, "post_process", False)):
        return False
    _quiet_tp_group_lookup()
    # torch types Module attributes as Tensor | Module; this one is a bound method
    model.compute_language_model_loss = torch.compile(  # type: ignore[assignment]
        model.compute_language_model_loss)  # type: ignore[arg-type]
    return True


def _allow_one_graph_per_layer(count: int) -> None:
    """Allow a recompile per layer instance, or past dynamo's limit (8) later layers would
    silently run eagerly."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * count)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * count)


def inductor_problem(device: torch.device) -> str | None:
    """Why torch.compile's inductor backend cannot build kernels here, or None."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - very old torch
            return "torch.compile on CUDA needs Triton, and this torch has no triton helper"
        return None if has_triton() else "torch.compile on CUDA needs Triton; pip install triton"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if any(c and shutil.which(c) for c in compilers):
        return None
    return ("torch.compile on CPU needs a C++ compiler for inductor (none of $CXX, g++, c++, "
            "clang++ found); install one (apt-get install g++)")


TP_GROUP_LOOKUP = ("megatron.core.tensor_parallel.layers",
                   "get_tensor_model_parallel_group_if_none")
"""The megatron name :func:`_quiet_tp_group_lookup` wraps (``tests/spawn/test_speed_options.py``
checks it is there and still warns)."""


def _quiet_tp_group_lookup() -> None:
    """megatron-core 0.16.1's ``RowParallelLinear`` passes ``tp_group=None`` on every forward,
    and the lookup then calls ``warnings.warn`` on rank 0 (a deprecation notice), which dynamo
    cannot trace: two graph breaks per layer, and rank 0 compiling other graphs than its peers.
    While dynamo traces, the wrapper returns the same default group without the warning;
    eager calls go to megatron's function unchanged."""
    import importlib

    from megatron.core import parallel_state as ps

    module = importlib.import_module(TP_GROUP_LOOKUP[0])
    original = getattr(module, TP_GROUP_LOOKUP[1])
    if getattr(original, "mptk_quiet", False):
        return

    def lookup(tp_group=None, is_expert=False, check_initialized=True):
        if tp_group is None and torch.compiler.is_compiling() and ps.is_initialized():
            if is_expert:
                return ps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
            return ps.get_tensor_model_parallel_group(check_initialized=check_initialized)
        return original(tp_group, is_expert=is_expert, check_initialized=check_initialized)

    lookup.mptk_quiet = True  # type: ignore[attr-defined]  # marker on the patched function, on purpose
    setattr(module, TP_GROUP_LOOKUP[1], lookup)
