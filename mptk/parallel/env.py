"""Who am I in the job: rank, world and rendezvous from torchrun's or Slurm's environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, slots=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """``torchrun``, ``slurm`` or ``spawn``."""


def from_torchrun(env: Mapping[str, str]) -> Optional[DistEnv]:
    """torchrun (and any launcher that sets RANK/WORLD_SIZE/MASTER_*)."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env["WORLD_SIZE"]),
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """First host of the job's node list (``scontrol show hostnames``)."""
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[0]


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    return 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def from_slurm(env: Mapping[str, str]) -> Optional[DistEnv]:
    """One task per device under ``srun`` (a job step: SLURM_STEP_ID is set)."""
    if "SLURM_PROCID" not in env or not env.get("SLURM_STEP_ID", "").isdigit():
        return None
    return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                   world_size=int(env["SLURM_NTASKS"]), master_addr=slurm_master_addr(env),
                   master_port=slurm_master_port(env), launcher="slurm")


def detect(env: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The launcher's environment, or ``None`` when started bare (mptk spawns the workers)."""
    env = os.environ if env is None else env
    return from_torchrun(env) or from_slurm(env)
