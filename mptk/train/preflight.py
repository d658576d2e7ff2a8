"""Preflight: everything that can be checked before any process starts or any weight exists.

:func:`preflight` (config, world size, CUDA visible -> :class:`Layout`) is what the CLI and
every worker run: the config's own checks, the recipe's, the pipeline stages and the compiler.
:func:`startup` adds what only the launching process checks: predicted memory (GPU runs) and
the checkpoints already in the run dir. Every problem is collected and raised as one
:class:`PreflightError`, one line each.
"""

from __future__ import annotations

import os

from mptk.config import registry
from mptk.config.checks import PreflightError, config_problems, on_cpu, slurm_world
from mptk.config.schema import ClusterConfig, RunConfig, TrainConfig
from mptk.parallel.layout import Layout, derive
from mptk.plan import hardware, partition, predict_fits

__all__ = ["Layout", "PreflightError", "preflight", "slurm_world", "startup"]


def preflight(cfg: RunConfig, world_size: int, cuda_available: bool) -> Layout:
    """The run's :class:`Layout`, or :class:`PreflightError` listing every problem."""
    problems = [
        *config_problems(cfg, world_size, cuda_available),
        *_recipe(cfg),
        *_gpu_table(cfg.cluster),
        *_compiler(cfg.train, on_cpu(cfg, cuda_available)),
    ]
    stages, stage_problems = _stages(cfg)
    problems += stage_problems
    if problems:
        raise PreflightError(problems)
    return derive(cfg, world_size, stages)


def startup(cfg: RunConfig, world_size: int, cuda_available: bool) -> Layout:
    """:func:`preflight`, then memory and checkpoint checks (``cfg.run_dir`` set)."""
    # Here, not at the top: preflight() stays torch-free for mptk-plan --why.
    from mptk.checkpoint.resume import startup_notes, startup_problems

    layout = preflight(cfg, world_size, cuda_available)
    problems = _memory(cfg, layout) + startup_problems(cfg, layout)
    if problems:
        raise PreflightError(problems)
    _say_once(startup_notes(cfg, layout))
    return layout


_SAID: set[str] = set()


def _say_once(notes: list[str]) -> None:
    """Lines about the run's start (a resume at another layout), printed by the launching
    process or rank 0 only, once."""
    from mptk.parallel.env import detect

    env = detect()
    for note in notes:
        if note not in _SAID and (env is None or env.rank == 0):
            _SAID.add(note)
            print(f"mptk: {note}", flush=True)


def _memory(cfg: RunConfig, layout: Layout) -> list[str]:
    """GPU runs: a layout mptk-plan predicts will not fit (``MPTK_PLAN_CHECK=0`` skips)."""
    if os.environ.get("MPTK_PLAN_CHECK", "1") == "0":
        return []
    fits, reason = predict_fits(cfg, layout, getattr(cfg, "cluster", None))
    return [] if fits else [f"memory: {reason} (MPTK_PLAN_CHECK=0 skips this check)"]


def _stages(cfg: RunConfig) -> tuple[list[int], list[str]]:
    """Layers per virtual stage, or the partition's one-line problem."""
    p = cfg.parallel
    if p.pp < 2 or (p.vpp or 1) < 1 or cfg.model.num_layers < 1:
        return [], []
    try:
        return partition.stage_layers(cfg.model, p.pp, p.vpp, p.layers_per_stage), []
    except partition.PartitionError as err:
        return [], [str(err)]

def _pipeline_forward(cfg: RunConfig) -> list[str]:
    if cfg.parallel.pp > 1 and not _has_pipeline_forward(cfg.model.recipe):
        return [f"model.recipe={cfg.model.recipe!r} has no pipeline forward; use "
                f"parallel.pp=1 or add forward= to the recipe"]
    return []


def _has_pipeline_forward(name: str) -> bool:
    try:
        return registry.get(name).forward is not None
    except KeyError:
        return True  # the unknown recipe has its own line

def _recipe(cfg: RunConfig) -> list[str]:
    """The recipe's own checks; an unknown recipe is one line naming the known ones."""
    try:
        recipe = registry.get(cfg.model.recipe)
    except KeyError as exc:
        return [f"{exc.args[0]}; fix model.recipe or pick another model=<option>"]
    try:
        return [*_pipeline_forward(cfg), *recipe.checks(cfg)]
    except Exception as exc:  # a recipe check tripping over an invalid field reported above
        return [f"model.recipe={recipe.name}: its checks failed ({type(exc).__name__}: {exc}); fix the lines above"]

def _gpu_table(cluster: ClusterConfig) -> list[str]:
    """The GPU named for MFU and the planner is in the table."""
    problems = []
    if cluster.gpu:
        try:
            hardware.gpu(cluster.gpu)
        except KeyError as err:
            problems.append(f"{err.args[0]}; or give cluster.peak_tflops=<dense TFLOP/s>")
    return problems

def _compiler(t: TrainConfig, on_cpu: bool) -> list[str]:
    """``train.compile``/``compile_loss`` need inductor's compiler (C++ on CPU, Triton on CUDA)."""
    if not (t.compile or t.compile_loss):
        return []
    import torch  # only when compiling: preflight() stays torch-free for mptk-plan --why

    from mptk.models.speed import inductor_problem

    problem = inductor_problem(torch.device("cpu" if on_cpu else "cuda"))
    return [f"train.compile: {problem}; or set train.compile=false train.compile_loss=false"] \
        if problem else []
