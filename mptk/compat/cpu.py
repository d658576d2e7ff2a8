"""megatron-core on a machine without a GPU: every CUDA assumption redirected to the CPU, here only.

megatron-core 0.16.1 assumes CUDA in a few places (see ``PATCHES``). :func:`activate` redirects
them and is called by :mod:`mptk.parallel.groups` only when the run's device is the CPU; on a GPU
nothing here is touched. Each patch names the megatron module and the source text it relies on:
``tests/unit/test_compat.py`` checks that text is still there, so a megatron-core upgrade that
moves a call site fails a test instead of silently running the CUDA path.

What is redirected:
- ``torch.cuda.current_device()`` -> the CPU device (attention's global memory buffer,
  inference KV buffers, ``param_and_grad_buffer``, p2p receive buffers).
- ``torch.cuda.synchronize`` -> no-op (p2p and dist-checkpoint saving).
- The CUDA RNG tracker -> :class:`CpuRNGStatesTracker`, which keeps megatron's semantics (a
  tensor-parallel stream different per TP rank and equal across DP, a data-parallel stream) on
  the CPU generator.
- Tensors created with ``device="cuda"`` or moved with ``.cuda()`` inside megatron's schedules
  -> the CPU, through :func:`device_scope` (a ``TorchFunctionMode``) around those calls.
- MoE: the alltoall dispatcher's CUDA side stream and host copy of its split sizes, the
  router's TE-only gating name, and the uneven-split tp all-gather / reduce-scatter (gloo takes
  equal sizes only) -> plain CPU equivalents.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True, slots=True)
class Patch:
    """One megatron-core CUDA call site that this module redirects."""

    module: str
    """Importable megatron module holding the call site."""
    needle: str
    """Source text the redirect relies on; a test fails if megatron drops it."""
    why: str
    """What breaks on CPU without the redirect."""


PATCHES: tuple[Patch, ...] = (
    Patch("megatron.core.utils", "device=torch.cuda.current_device()",
          "GlobalMemoryBuffer allocates attention scores on the current CUDA device"),
    Patch("megatron.core.transformer.dot_product_attention",
          "parallel_state.get_global_memory_buffer().get_tensor(",
          "local attention takes its score buffer from the global memory buffer"),
    Patch("megatron.core.transformer.dot_product_attention",
          "tensor_parallel.get_cuda_rng_tracker().fork()",
          "attention dropout always forks the CUDA RNG tracker"),
    Patch("megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state()",
          "the stock tracker reads and writes the CUDA generator"),
    Patch("megatron.core.tensor_parallel.random", "torch.cuda.random.get_rng_state(device=device)",
          "activation recomputation (checkpoint) saves and restores the CUDA generator's state"),
    Patch("megatron.core.tensor_parallel.random", "torch.cuda.manual_seed(data_parallel_seed)",
          "model_parallel_cuda_manual_seed seeds the CUDA generator"),
    Patch("megatron.core.pipeline_parallel.schedules", 'device="cuda"',
          "the schedules build loss/num-token tensors on CUDA, even at pp=1"),
    Patch("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.current_device()",
          "pipeline receive buffers are allocated on the current CUDA device"),
    Patch("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.synchronize()",
          "batched p2p synchronizes the CUDA stream"),
    Patch("megatron.core.models.common.language_module.language_module",
          "weight.data = weight.data.cuda()",
          "tied embeddings at pp>1 move the last stage's copy to CUDA before the all-reduce"),
    Patch("megatron.core.models.vision.clip_vit_model",
          "torch.arange(self.seq_length).expand(1, -1).cuda()",
          "CLIPViTModel puts its position ids on CUDA when built (ViT recipe: device_scope)"),
    Patch("megatron.core.models.common.embeddings.rope_utils",
          'device="cpu", pin_memory=True\n    ).cuda(non_blocking=True)',
          "RoPE at context parallelism picks this cp rank's chunks with a pinned CUDA index"),
    Patch("megatron.core.transformer.moe.token_dispatcher",
          "MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = torch.cuda.Stream()",
          "the MoE alltoall dispatcher creates a CUDA side stream when built"),
    Patch("megatron.core.transformer.moe.token_dispatcher",
          "with torch.cuda.stream(self.cuda_dtoh_stream):",
          "the MoE alltoall dispatcher copies its split sizes to the host on that stream"),
    Patch("megatron.core.transformer.moe.moe_utils", "if te_general_gemm is not None",
          "the MoE router's gating linear reads a name bound only when TE imports"),
    Patch("megatron.core.tensor_parallel.mappings",
          "torch.distributed.all_gather(output_tensor_list, input_, group=group)",
          "MoE at tp>1 all-gathers uneven token counts over tp, which gloo refuses"),
    Patch("megatron.core.tensor_parallel.mappings",
          "torch.distributed.reduce_scatter(output, input_tensor_list, group=group)",
          "MoE at tp>1 reduce-scatters uneven token counts over tp, which gloo lacks"),
)


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """megatron's RNG tracker with the named states kept for the CPU generator."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def model_parallel_cpu_manual_seed(seed: int, tp_rank: int) -> None:
    """CPU twin of megatron's ``model_parallel_cuda_manual_seed`` (same offsets)."""
    torch.manual_seed(seed)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def _to_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class CudaToCpuMode(TorchFunctionMode):
    """Maps ``device="cuda"`` arguments and ``Tensor.cuda()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu(kwargs["device"])}
        if func is torch.Tensor.to:
            args = tuple(_to_cpu(a) for a in args)
        return func(*args, **kwargs)


_ACTIVE = False


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def _pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """megatron's ``get_pos_emb_on_this_cp_rank`` with a plain CPU index (same chunks: rank r
    keeps r and 2cp-1-r of 2cp), since pinned memory needs an accelerator."""
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    shape = pos_emb.shape
    pos_emb = pos_emb.view(*shape[:seq_dim], 2 * cp_size, -1, *shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.reshape(*shape[:seq_dim], -1, *shape[seq_dim + 1:])


TESTED_MEGATRON = "0.16.1"
"""The megatron-core release whose call sites ``PATCHES`` and :func:`activate` were checked against."""

REPLACED: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.transformer.moe.token_dispatcher", "MoEAlltoAllTokenDispatcher"),
    ("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim"),
    ("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim"),
)
"""Module attributes :func:`activate` replaces: assigning a missing one would silently do nothing."""


class CompatError(RuntimeError):
    """The installed megatron-core lacks a call site this layer redirects."""


def check_call_sites() -> None:
    """Raise :class:`CompatError` (one line: what is missing, the versions, the fix) when a
    replaced attribute or a ``PATCHES`` call site is not in the installed megatron-core."""
    import importlib
    import inspect

    for module, name in REPLACED:
        if not hasattr(importlib.import_module(module), name):
            raise CompatError(_missing(f"{module}.{name}"))
    for patch in PATCHES:
        if patch.needle not in inspect.getsource(importlib.import_module(patch.module)):
            raise CompatError(_missing(f"{patch.module}: {patch.needle!r}"))


def _missing(what: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("megatron-core")
    except PackageNotFoundError:
        installed = "unknown"
    return (f"mptk.compat: {what} not found in megatron-core {installed} (tested: "
            f"{TESTED_MEGATRON}); pin megatron-core=={TESTED_MEGATRON}")


def activate() -> None:
    """Redirect megatron-core's CUDA call sites to the CPU (idempotent; CPU runs only)."""
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError("mptk.compat.cpu.activate() is for machines without a GPU")
    check_call_sites()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed: no probing, no warning
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]  # monkeypatch on purpose (CPU runs)
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # There is no CUDA generator: every random op draws from the CPU generator, whose state
    # the checkpoint function saves and restores itself.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    _moe_dispatcher_on_cpu()
    _ACTIVE = True


class _HostStream:
    """Stands in for the dispatcher's CUDA side stream (never used on the CPU)."""


def _dtoh_on_cpu(self, point: str, tokens_per_expert=None):
    """The alltoall dispatcher's host copy of its split sizes, without streams: the GPU path
    turns them into numpy arrays at ``cuda_dtoh_point``; on the CPU they only change type."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _moe_dispatcher_on_cpu() -> None:
    """The MoE router and alltoall dispatcher without TE and CUDA streams."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not moe_utils.HAVE_TE:  # unbound without TE: the router's gating would raise NameError
        moe_utils.te_general_gemm = None

    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = _HostStream()  # no CUDA stream is made
    dispatcher._maybe_dtoh_and_synchronize = _dtoh_on_cpu
    from megatron.core.tensor_parallel import mappings

    mappings._gather_along_first_dim = _uneven(mappings._gather_along_first_dim, _gather_uneven)
    mappings._reduce_scatter_along_first_dim = _uneven(
        mappings._reduce_scatter_along_first_dim, _reduce_scatter_uneven)


def _uneven(equal, uneven):
    """megatron's collective for equal splits, ``uneven`` (equal-size gloo calls) otherwise."""
    def collective(input_, group, split_sizes=None, use_global_buffer=False):
        if split_sizes is None or group.size() == 1:
            return equal(input_, group, split_sizes, use_global_buffer)
        return uneven(input_, group, [int(n) for n in split_sizes])
    return collective


def _gather_uneven(input_, group, sizes: list[int]):
    """All-gather of ``sizes[r]`` rows from rank r: padded to the longest, then trimmed."""
    import torch.distributed as dist

    padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
    padded[:input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _reduce_scatter_uneven(input_, group, sizes: list[int]):
    """Reduce-scatter keeping rank r's ``sizes[r]`` rows: an all-reduce, then this rank's rows."""
    import torch.distributed as dist

    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(sizes[:group.rank()])
    return total[start:start + sizes[group.rank()]].clone()


def device_scope():
    """Context for calls into megatron code that builds CUDA tensors (schedules, optimizer
    helpers): maps them to the CPU while active, a no-op on GPU. Kept off the pp=1 hot path,
    since a TorchFunctionMode sees every torch call."""
    return CudaToCpuMode() if _ACTIVE else contextlib.nullcontext()


def is_active() -> bool:
    return _ACTIVE
