"""Where a run starts: a full resume, weights only (``train.init_from``) or fresh.

:func:`decide` is the one choice, a pure function of ``train.resume``, ``train.init_from``, the
run dir's own checkpoints and what a path names. Both sides use it and print its lines:

- ``mptk-train`` before any process starts (:func:`startup_problems`, from
  :mod:`mptk.train.preflight`): the file system only, nothing hashed;
- every worker (:func:`prepare`, then :func:`restore`): the candidates are verified between
  the ranks, a damaged one is reported and the next older one tried.

Rules: ``docs/checkpoints.md`` (Resume).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mptk.checkpoint import format as fmt
from mptk.checkpoint import hf, state
from mptk.checkpoint.format import CheckpointError
from mptk.checkpoint.ranks import from_rank0, rank, say, warn
from mptk.config.checks import checkpoint_problems

RESUME, INIT_FROM, FRESH = "resume", "init_from", "fresh"
INIT_FROM_HF = "init_from_hf"
"""Weights only, from a Hugging Face folder (``train.init_from=hf:DIR``)."""
RESUME_KEYS = ("tp", "pp", "vpp", "dp", "zero_stage", "dtype", "global_batch_size")
"""What must match for a full resume (DeepSpeed's optimizer state is not reshardable here)."""


@dataclass(frozen=True)
class Decision:
    """What a run starts from, before anything is verified."""

    source: str = FRESH
    """:data:`RESUME` (module, optimizer, step, RNG), :data:`INIT_FROM` (weights only) or
    :data:`FRESH`."""
    pool: tuple[Path, ...] = ()
    """Candidates, newest first: the first intact one is used."""
    own: bool = False
    """The pool is this run dir's own checkpoints (a damaged one is set aside)."""
    setting: str = ""
    """The setting that named the pool, for messages (``train.resume=auto``)."""
    problems: tuple[str, ...] = ()
    """One line each; the run cannot start while there are any."""


# --------------------------------------------------------------------------- the one choice


def _nothing_there(setting: str) -> str:
    return f"{setting}: no checkpoint there; give a checkpoint, its checkpoints dir or its run dir"


def decide(resume: str, init_from: Optional[str], own: Sequence[Path],
           found: Callable[[str], list[Path]] = fmt.resolve) -> Decision:
    """The start of a run: ``own`` are the run dir's checkpoints (newest first), ``found(path)``
    the checkpoints a path names. The run's own checkpoints win over a ``resume`` path and over
    ``init_from`` (a requeued job continues where it stopped)."""
    resume, own = str(resume), tuple(own)
    if own and resume != "none":
        return Decision(RESUME, own, own=True, setting=f"train.resume={resume}")
    problems = []
    if own:
        problems.append(f"train.resume=none but {own[0]} exists; use a new hydra.run.dir, "
                        f"delete {own[0].parent} or train.resume=auto")
    elif resume not in ("none", "auto"):
        pool = tuple(found(resume))
        if pool:
            return Decision(RESUME, pool, setting=f"train.resume={resume}")
        problems.append(_nothing_there(f"train.resume={resume}"))
    if init_from:
        pool = tuple(found(init_from))
        if pool and not problems:
            return Decision(INIT_FROM, pool, setting=f"train.init_from={init_from}")
        if not pool:
            problems.append(_nothing_there(f"train.init_from={init_from}"))
    return Decision(FRESH, problems=tuple(problems))


def decide_for(cfg) -> Decision:
    """:func:`decide` for a run config, reading ``cfg.run_dir`` now."""
    own = fmt.candidates(fmt.checkpoints_dir(cfg.run_dir))
    if hf.hf_dir(cfg.train.init_from) is None:
        return decide(cfg.train.resume, cfg.train.init_from, own)
    decision = decide(cfg.train.resume, None, own)
    if decision.source != FRESH or decision.problems:
        return decision
    return Decision(INIT_FROM_HF, setting=f"train.init_from={cfg.train.init_from}",
                    problems=tuple(hf.problems(cfg, cfg.train.init_from)))


def layout_problem(folder: Path, saved: dict, now: dict) -> Optional[str]:
    """One line when a full resume from ``folder`` (saved with ``saved``) cannot run as ``now``
    (both :func:`mptk.checkpoint.format.layout_record`)."""
    diff = [f"{k} {saved.get(k)}->{now[k]}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if not diff:
        return None
    return (f"train.resume: {folder} was saved with another layout ({', '.join(diff)}); "
            f"a full resume needs the same one: restore it, or start a new hydra.run.dir with "
            f"train.init_from={folder} (its weights, a fresh optimizer)")


def no_intact(decision: Decision) -> str:
    """The line when every candidate of ``decision`` is damaged."""
    return (f"{decision.setting.partition('=')[0]}: no intact checkpoint among "
            f"{[str(p) for p in decision.pool]}; repair or move them, or start a new "
            f"hydra.run.dir")


# --------------------------------------------------------------------------- before any process


def startup_problems(cfg, layout=None) -> list[str]:
    """What ``mptk-train`` refuses before any process starts, one line each: the problems of
    :func:`decide` and (given the :class:`~mptk.parallel.layout.Layout`) a full resume at
    another layout. Only the newest candidate's meta is read: nothing is hashed here, the
    workers verify again and fall back to an older intact checkpoint."""
    decision = decide_for(cfg)
    problems = list(decision.problems)
    if layout is None or problems or decision.source != RESUME:
        return problems
    folder = decision.pool[0]
    saved = fmt.saved_layout(folder)
    message = layout_problem(folder, saved, fmt.layout_record(cfg, layout)) if saved else None
    return [message] if message else []


# --------------------------------------------------------------------------- in the workers


@dataclass
class Plan:
    """The verified start of a worker: ``folder`` is the checkpoint to resume from (None: a
    fresh optimizer, maybe with ``init_from`` weights already loaded)."""

    folder: Optional[Path] = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def first_intact(decision: Decision) -> Plan:
    """The first candidate of ``decision`` that verifies (a collective); a warning names each
    damaged one, and the run's own damaged ones are set aside."""
    plan = Plan()
    for folder in decision.pool:
        problems = fmt.verify(folder)
        if not problems:
            plan.folder, plan.meta = folder, fmt.read_json(folder / fmt.META)
            return plan
        text = f"checkpoint {folder} is damaged ({'; '.join(problems[:3])}); trying an older one"
        plan.warnings.append(text)
        warn(text + ("; moved aside as *.damaged-*" if decision.own else ""))
        if decision.own and rank() == 0:
            fmt.set_aside(folder)
    if decision.pool:
        raise CheckpointError(no_intact(decision))
    return plan


def prepare(cfg, layout, model: torch.nn.Module) -> Plan:
    """Before DeepSpeed takes ``model``: the checkpoint to resume from (its layout checked), or
    else ``train.init_from`` weights loaded into ``model``. A collective: rank 0 lists the run
    dir, every rank verifies a share of the files."""
    problems = checkpoint_problems(cfg.train)
    decision = from_rank0(decide_for(cfg) if rank() == 0 else None)
    problems += list(decision.problems)
    if problems:
        raise CheckpointError("; ".join(problems))
    plan = first_intact(decision)
    if decision.source == RESUME:
        assert plan.folder is not None  # decide(): a RESUME pool is never empty; first_intact picks or raises
        message = layout_problem(plan.folder, plan.meta.get("layout", {}),
                                 fmt.layout_record(cfg, layout))
        if message:
            raise CheckpointError(message)
    elif decision.source == INIT_FROM:
        assert plan.folder is not None  # likewise for an INIT_FROM pool
        state.load_weights(state.chunks_of(model), plan.folder)
        say(f"initialised weights from {plan.folder} (step {plan.meta.get('step')}); "
            f"fresh optimizer")
        return Plan(warnings=plan.warnings)
    elif decision.source == INIT_FROM_HF:
        folder = hf.hf_dir(cfg.train.init_from)
        assert folder is not None  # decide_for() chose INIT_FROM_HF from it
        hf.load_into(state.chunks_of(model), cfg.model, folder)
        say(f"initialised weights from the Hugging Face folder {folder}; fresh optimizer")
    return plan


def restore(engine, plan: Plan) -> int:
    """After DeepSpeed exists: load the plan's checkpoint into ``engine`` and every rank's RNG.
    Returns the number of steps already done (0 without a checkpoint). The run's own follow-ups
    (LR, W&B, metrics) are :mod:`mptk.train.resume`'s."""
    if plan.folder is None:
        return 0
    step = int(plan.meta["step"])
    state.load_rank_state(engine, plan.folder, step)
    return step
