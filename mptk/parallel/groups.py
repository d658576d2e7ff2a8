"""The one owner of distributed state: the default process group, megatron-core's tp/pp/dp
groups and the model-parallel RNG seeds. Model code never creates process groups.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mptk.config.schema import Backend, Device
from mptk.parallel.env import DistEnv

_AXES = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
         "vpp": "virtual_pipeline_model_parallel_size", "cp": "context_parallel_size",
         "ep": "expert_model_parallel_size"}


def megatron_sizes(tp: int, pp: int, vpp: Optional[int] = None,
                   cp: int = 1, ep: int = 1) -> dict[str, Optional[int]]:
    """Short axis names mapped to megatron's long keyword names (the only such mapping)."""
    return {_AXES["tp"]: tp, _AXES["pp"]: pp, _AXES["vpp"]: vpp if vpp and vpp > 1 else None,
            _AXES["cp"]: cp, _AXES["ep"]: ep}


def resolve_device(device: Device) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else the CPU."""
    if device is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend is Backend.auto:
        return "nccl" if device.type == "cuda" else "gloo"
    return str(backend.value)


def init(env: DistEnv, tp: int, pp: int, device: torch.device, backend: str, seed: int,
         vpp: Optional[int] = None, cp: int = 1, ep: int = 1) -> None:
    """Default group from ``env``, then megatron's groups (world = tp * cp * pp * dp, megatron's
    rank order tp-cp-ep-dp-pp; ep folds into dp x cp), then per-tp-rank seeds (equal on cp
    peers, as on dp peers)."""
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    else:
        from mptk.compat import cpu

        cpu.activate()
    export_env(env)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=10))
    if ps.model_parallel_is_initialized():  # another layout in the same processes
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(**megatron_sizes(tp, pp, vpp, cp, ep))
    seed_model_parallel(seed, device)


def export_env(env: DistEnv) -> None:
    """torch-style variables, which DeepSpeed reads (LOCAL_RANK) whatever the launcher."""
    os.environ.update(RANK=str(env.rank), LOCAL_RANK=str(env.local_rank),
                      WORLD_SIZE=str(env.world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))


def seed_model_parallel(seed: int, device: torch.device) -> None:
    """megatron's seeding semantics: a TP stream per tp rank, equal across dp."""
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    else:
        from mptk.compat.cpu import model_parallel_cpu_manual_seed

        model_parallel_cpu_manual_seed(seed, ps.get_tensor_model_parallel_rank())


def tp_rank() -> int:
    return int(ps.get_tensor_model_parallel_rank())


def tp_size() -> int:
    return int(ps.get_tensor_model_parallel_world_size())


def tp_group() -> Any:
    return ps.get_tensor_model_parallel_group()


def pp_rank() -> int:
    return int(ps.get_pipeline_model_parallel_rank())


def dp_rank() -> int:
    return int(ps.get_data_parallel_rank())


def dp_size() -> int:
    return int(ps.get_data_parallel_world_size())


def dp_group() -> Any:
    """Pure dp: the ranks that read different samples (cp peers are not in it)."""
    return ps.get_data_parallel_group()


def cp_rank() -> int:
    return int(ps.get_context_parallel_rank())


def cp_size() -> int:
    """Context-parallel degree (1 before megatron's groups exist: single-process builds)."""
    return int(ps.get_context_parallel_world_size()) if ps.model_parallel_is_initialized() else 1


def cp_group() -> Any:
    return ps.get_context_parallel_group()


def dp_cp_group() -> Any:
    """dp x cp: the ranks whose gradients (and token-mean losses) are averaged together;
    cp peers saw other tokens of the same samples."""
    return ps.get_data_parallel_group(with_context_parallel=True)


def dp_cp_size() -> int:
    return int(ps.get_data_parallel_world_size(with_context_parallel=True))


def ep_size() -> int:
    """Expert-parallel degree (1 before megatron's groups exist)."""
    return int(ps.get_expert_model_parallel_world_size()) if ps.model_parallel_is_initialized() else 1


def ep_group() -> Any:
    """The ranks that hold different experts of one MoE layer (tokens exchanged by all-to-all)."""
    return ps.get_expert_model_parallel_group()


def expert_dp_group() -> Any:
    """The ranks holding the same experts: expert gradients are summed over it."""
    return ps.get_expert_data_parallel_group()


def is_last_stage(vp_stage: Optional[int] = None) -> bool:
    return bool(ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage))


def is_first_stage(vp_stage: Optional[int] = None) -> bool:
    return bool(ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def finish(exit_code: int = 0) -> None:
    """End a worker without gloo's exit race: barrier, flush, then a hard exit.

    On torch 2.13 a gloo worker aborts during interpreter shutdown in about 1 run of 5
    ("terminate called without an active exception") once DeepSpeed holds groups; skipping
    the interpreter's teardown after a final barrier avoids it.
    """
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
