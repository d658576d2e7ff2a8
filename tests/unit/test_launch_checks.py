"""Where a process stands under Slurm (a srun rank, or the one task of a Hydra submitit sweep job)
and the preflight lines that follow from it; the nsys wrapper without a profile window."""

from __future__ import annotations

import pytest

from mptk.config.checks import config_problems, slurm_rank_task, submitit_job, submitit_tasks
from mptk.config.schema import ClusterConfig, ParallelConfig, RunConfig, TrainConfig
from mptk.parallel.env import from_slurm

# A task of `srun` inside an sbatch job, and the same with what submitit's job adds.
SRUN = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "41", "MASTER_ADDR": "vm", "MASTER_PORT": "15041"}
SUBMITIT = {**SRUN, "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/tmp/sweep/.submitit/41_0"}


def test_srun_task_is_a_rank_submitit_task_spawns_its_ranks():
    assert slurm_rank_task(SRUN) and not submitit_job(SRUN)
    dist = from_slurm(SRUN)
    assert dist is not None and (dist.rank, dist.world_size, dist.launcher) == (0, 1, "slurm")
    assert submitit_job(SUBMITIT) and not slurm_rank_task(SUBMITIT)
    assert from_slurm(SUBMITIT) is None  # mptk-train spawns launcher.nproc_per_node ranks
    assert not slurm_rank_task({**SRUN, "SLURM_STEP_ID": ""})  # the batch script itself


def test_submitit_job_with_several_tasks_is_refused_in_one_line():
    assert submitit_tasks(SUBMITIT) == [] and submitit_tasks({**SRUN, "SLURM_NTASKS": "4"}) == []
    [line] = submitit_tasks({**SUBMITIT, "SLURM_NTASKS": "4"})
    assert line.startswith("hydra.launcher: this submitit job has 4 Slurm tasks")
    assert "hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=1" in line


def run_cfg(**changes) -> RunConfig:
    from mptk.config import registry

    model = registry.get("gpt").config(num_layers=2, hidden_size=64, num_attention_heads=4,
                                       seq_length=32, vocab_size=512)
    cfg = RunConfig(model=model, parallel=ParallelConfig(tp=1), train=TrainConfig(
        steps=10, micro_batch_size=2, global_batch_size=4), cluster=ClusterConfig(nsys=True))
    for dotted, value in changes.items():
        group, name = dotted.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


def nsys_lines(cfg: RunConfig) -> list[str]:
    return [p for p in config_problems(cfg, 2, False) if "nsys" in p]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in ("MPTK_NSYS", "SUBMITIT_FOLDER", "SUBMITIT_EXECUTOR", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def test_nsys_without_a_profile_window_is_one_line():
    assert nsys_lines(run_cfg()) == [
        "cluster.nsys=true with no profile window (profile.start_step < 0): nsys captures only that "
        "window; set e.g. profile.start_step=2 profile.end_step=4, or cluster.nsys=false"]


def test_nsys_window_after_the_last_step_is_one_line():
    [line] = nsys_lines(run_cfg(profile__start_step=12, profile__end_step=14))
    assert "profile.start_step(12) >= train.steps(10), a window that never opens" in line


def test_nsys_with_a_window_and_a_window_without_nsys_pass():
    assert nsys_lines(run_cfg(profile__start_step=2, profile__end_step=4)) == []
    assert nsys_lines(run_cfg(cluster__nsys=False)) == []


def test_mptk_nsys_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("MPTK_NSYS", "1")
    [line] = nsys_lines(run_cfg(cluster__nsys=False))
    assert line.startswith("MPTK_NSYS=1 with no profile window")
    monkeypatch.setenv("MPTK_NSYS", "0")
    assert nsys_lines(run_cfg(cluster__nsys=False)) == []


def test_gloo_on_loopback_across_nodes_is_refused():
    cfg = run_cfg(cluster__nsys=False, cluster__nodes=2, cluster__env={"GLOO_SOCKET_IFNAME": "lo"})
    [line] = [p for p in config_problems(cfg, 2, False) if "GLOO" in p]
    assert line.startswith("cluster.env.GLOO_SOCKET_IFNAME=lo with cluster.nodes(2) > 1: loopback")
    for ok in (run_cfg(cluster__nsys=False, cluster__env={"GLOO_SOCKET_IFNAME": "lo"}),
               run_cfg(cluster__nsys=False, cluster__nodes=2, cluster__env={"GLOO_SOCKET_IFNAME": "eth0"})):
        assert not [p for p in config_problems(ok, 2, False) if "GLOO" in p]
