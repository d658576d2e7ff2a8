"""What one rank saves into a checkpoint and loads back: its RNG streams, the model weights
through megatron dist-checkpointing, and DeepSpeed's engine state (module, optimizer/ZeRO
partitions, LR scheduler). Where these land on disk is :mod:`mptk.checkpoint.format`.

Weights are stored twice on purpose: DeepSpeed's copy gives an exact resume at the same layout
(its optimizer partitions are keyed to the dp/ZeRO layout); the dist-checkpointing copy is keyed
by global tensor names and shapes, so it loads at any tp/pp/vpp. The optimizer state is likewise
written a second time, reshardable (:mod:`mptk.checkpoint.optim_state`), for a resume at another
layout.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from mptk.checkpoint import optim_state
from mptk.checkpoint.format import (
    DEEPSPEED_TAG,
    HOLDS_DEEPSPEED,
    HOLDS_OPTIM,
    OPTIM,
    RNG,
    WEIGHTS,
    CheckpointError,
    parts_record,
)
from mptk.checkpoint.ranks import rank


def chunks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model chunks of this rank (a ModuleList holds virtual-pipeline chunks)."""
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG stream of this rank: torch CPU (+CUDA), megatron's tracker, python, numpy."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(),
             "tracker": {k: v.clone() for k, v in
                         tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` took (CUDA only where there is a GPU now)."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(folder: Path, rank_id: int) -> Path:
    """The RNG file of ``rank_id`` in checkpoint ``folder``."""
    return Path(folder) / RNG / f"rank_{rank_id:05d}.pt"


# --------------------------------------------------------------------------- weights (dist-ckpt)


def sharded_weights(chunks: list[torch.nn.Module]) -> dict:
    """megatron's sharded state dict per chunk (tensor keys hold global layer numbers, so a
    checkpoint loads at any tp/pp); a fresh ``metadata`` dict per call."""
    from megatron.core.transformer.utils import sharded_state_dict_default

    return {f"chunk{i}": sharded_state_dict_default(c, prefix="", metadata={})
            for i, c in enumerate(chunks)}


def _gathered(chunks: list[torch.nn.Module], zero_stage: int):
    """ZeRO-3 holds parameter partitions: gather them (read-only) for the save."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for c in chunks for p in c.parameters()])


def _local_results_queue() -> None:
    """``torch_dist`` writes through processes forked from this one; the save function itself
    runs here (synchronous save) and hands their results to a global queue that megatron makes
    a Manager queue, which *spawns* a server process (seconds: it re-imports the entry point)
    that would outlive a hard exit. An in-process queue does the same job here."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def end_write_helpers() -> None:
    """Drop the results queue; shut down its Manager process if megatron started one (it
    would outlive the worker's hard exit and hold its stdout open)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results, filesystem_async._results_queue = filesystem_async._results_queue, None
    manager = getattr(results, "_manager", None)
    if manager is not None:
        manager.shutdown()


def save_weights(chunks: list[torch.nn.Module], folder: Path, zero_stage: int) -> None:
    """Model weights through dist-checkpointing (``torch_dist``) into existing ``folder``."""
    from megatron.core import dist_checkpointing

    _local_results_queue()
    with _gathered(chunks, zero_stage):
        dist_checkpointing.save(sharded_weights(chunks), str(folder))
    end_write_helpers()


def load_weights(chunks: list[torch.nn.Module], folder: Path) -> None:
    """Weights of checkpoint ``folder`` into ``chunks`` (any saved tp/pp; a collective)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_weights(chunks), str(Path(folder) / WEIGHTS))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"], strict=True)


# --------------------------------------------------------------------------- one rank's share


def parts_to_write(engine, optim: bool) -> dict:
    """What this run's checkpoints hold besides weights and RNG
    (:func:`mptk.checkpoint.format.parts_record`, recorded in ``meta.json``): the reshardable
    optimizer state when ``optim`` (``train.save_reshardable_optim``), and DeepSpeed's own
    state except with experts split over ep ranks: DeepSpeed's MoE checkpoint path wants its
    own expert modules, and its model file would keep one ep rank's experts only. There the
    weights and the reshardable optimizer state (which know every expert) are the whole resume
    state."""
    moe = getattr(engine, "has_moe_layers", False)  # set by mptk.engine.experts.bridge
    return parts_record(not moe, optim)


def save_rank_state(engine, folder: Path, step: int, global_batch_size: int,
                    zero_stage: int, parts: dict) -> None:
    """This rank's share of checkpoint ``step`` into ``folder``: weights, the ``parts``
    (:func:`parts_to_write`: the reshardable optimizer state, DeepSpeed state with the step in
    its client state, checked on load) and its RNG file. Every rank calls it."""
    chunks = chunks_of(engine.module)
    save_weights(chunks, Path(folder) / WEIGHTS, zero_stage)
    if parts[HOLDS_OPTIM]:
        _local_results_queue()
        optim_state.save(engine, chunks, Path(folder) / OPTIM)
        end_write_helpers()
    if parts[HOLDS_DEEPSPEED]:
        client = {"step": step, "consumed_samples": step * global_batch_size}
        engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, client_state=client,
                               save_latest=False)
    torch.save(rng_state(), rng_file(folder, rank()))


def load_rank_state(engine, folder: Path, step: int) -> None:
    """This rank's share of checkpoint ``folder`` (saved at ``step``) into ``engine``: module,
    optimizer/ZeRO partitions, LR scheduler, then its RNG streams. Every rank calls it."""
    path, client = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=True)
    if path is None or int((client or {}).get("step", -1)) != step:
        raise CheckpointError(f"train.resume: DeepSpeed could not load {folder}/"
                              f"{DEEPSPEED_TAG} at step {step}; move that checkpoint aside")
    set_rng_state(torch.load(rng_file(folder, rank()), weights_only=False))


def load_relayout_state(engine, folder: Path, step: int, global_batch_size: int) -> None:
    """Checkpoint ``folder``, saved at another layout, into ``engine``: the optimizer state
    resharded (the weights were loaded before DeepSpeed took the model), the LR schedule and
    DeepSpeed's counters at ``step``. The RNG streams are the caller's (rank files belong to
    the saved layout's ranks)."""
    optim_state.load(engine, chunks_of(engine.module), Path(folder) / OPTIM)
    sched = engine.lr_scheduler
    if sched is not None:
        sched.last_epoch, sched._step_count = step, step + 1
    engine.global_steps, engine.global_samples = step, step * global_batch_size
