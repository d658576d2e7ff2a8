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
from mptk.checkpoint.format import HOLDS_DEEPSPEED, HOLDS_OPTIM, OPTIM, CheckpointError
from mptk.checkpoint.ranks import from_rank0, rank, say, warn
from mptk.config.checks import checkpoint_problems

RESUME, INIT_FROM, FRESH = "resume", "init_from", "fresh"
INIT_FROM_HF = "init_from_hf"
"""Weights only, from a Hugging Face folder (``train.init_from=hf:DIR``)."""
RESHARD_KEYS = ("tp", "pp", "vpp", "dp", "cp", "ep", "stage_layers", "zero_stage")
"""What a full resume may change: the weights and the optimizer state are resharded
(:mod:`mptk.checkpoint.optim_state`); DeepSpeed's own copy needs them all equal."""
FIXED_KEYS = ("dtype", "global_batch_size")
"""What a full resume keeps (the saved master precision; the data position in samples)."""
RESUME_KEYS = RESHARD_KEYS + FIXED_KEYS
"""What must match for DeepSpeed's own, bit-exact resume."""
SHAPE_KEYS = ("recipe", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size", "num_experts")
"""Model fields no resume can change (the tensors' global shapes)."""
_DEFAULTS = {"cp": 1, "stage_layers": [], "ep": 1}
_SHORT = {"zero_stage": "zero", "stage_layers": "stages"}


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


def _saved(saved: dict, key: str):
    return saved.get(key, _DEFAULTS.get(key))


def _diff(saved: dict, now: dict, keys) -> list[str]:
    """``name old->new`` per key of ``keys`` that differs (older meta lacks some: defaults)."""
    return [f"{_SHORT.get(k, k)} {_fmt(_saved(saved, k))}->{_fmt(now.get(k, _DEFAULTS.get(k)))}"
            for k in keys if _saved(saved, k) != now.get(k, _DEFAULTS.get(k))]


def _fmt(value) -> str:
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def layout_changes(saved: dict, now: dict) -> list[str]:
    """What a full resume from a checkpoint saved with ``saved`` changes at ``now`` (both
    :func:`mptk.checkpoint.format.layout_record`), e.g. ``["tp 2->1", "dp 2->4"]``. The
    stages are named only when pp stays (a new pp brings new stages)."""
    changes = _diff(saved, now, RESHARD_KEYS)
    if _saved(saved, "pp") != now.get("pp"):
        changes = [c for c in changes if not c.startswith(f"{_SHORT['stage_layers']} ")]
    return changes


def relayout_line(changes: list[str]) -> str:
    """The one line saying what a resume at another layout changes."""
    return f"resuming at another layout: {', '.join(changes)}"


def layout_problem(folder: Path, saved: dict, now: dict,
                   reshardable: bool = False) -> Optional[str]:
    """One line when a full resume from ``folder`` (saved with ``saved``) cannot run as ``now``
    (both :func:`mptk.checkpoint.format.layout_record`); ``reshardable``: the checkpoint holds
    the optimizer state of :mod:`mptk.checkpoint.optim_state` (:func:`reshardable`)."""
    fixed, changes = _diff(saved, now, FIXED_KEYS), layout_changes(saved, now)
    if not fixed and (not changes or reshardable):
        return None
    init_from = (f"start a new hydra.run.dir with train.init_from={folder} (its weights, a "
                 f"fresh optimizer)")
    if fixed:
        return (f"train.resume: {folder} was saved with {', '.join(fixed)}; a full resume keeps "
                f"train.dtype and train.global_batch_size: restore them, or {init_from}")
    return (f"train.resume: {folder} was saved with another layout ({', '.join(changes)}) and "
            f"{_why_no_optim(folder)}: restore that layout, or {init_from}")


def _why_no_optim(folder: Path) -> str:
    """Why ``folder`` holds no reshardable optimizer state, and what avoids it next time."""
    if HOLDS_OPTIM in (fmt.read_meta(folder) or {}):  # recorded: the run chose not to write it
        return (f"it has no {OPTIM}/ (saved with train.save_reshardable_optim=false; keep that "
                f"true in runs that may resume at another layout)")
    return f"it holds no reshardable optimizer state (no {OPTIM}/: saved by an older mptk)"


def shape_problem(folder: Path, cfg) -> Optional[str]:
    """One line when ``cfg.model`` differs from the model saved in ``folder`` in a field that
    sets a tensor's global shape (nothing then loads)."""
    try:
        saved = fmt.read_json(Path(folder) / fmt.CONFIG).get("model", {})
    except (OSError, ValueError):
        return None
    diff = [f"model.{k} {saved[k]}->{getattr(cfg.model, k)}" for k in SHAPE_KEYS
            if k in saved and hasattr(cfg.model, k) and saved[k] != getattr(cfg.model, k)]
    if not diff:
        return None
    return (f"train.resume: {folder} holds another model ({', '.join(diff)}); no resume changes "
            f"the model's shape: restore those fields, or use a new hydra.run.dir")


def reshardable(folder: Path, meta: Optional[dict] = None) -> bool:
    """Whether checkpoint ``folder`` (its meta.json, or ``meta``) holds the reshardable
    optimizer state, as its save recorded (:func:`mptk.checkpoint.format.holds`)."""
    return fmt.holds(folder, meta)[HOLDS_OPTIM]


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
    shape = shape_problem(folder, cfg)
    if shape or not saved:
        return [shape] if shape else []
    message = layout_problem(folder, saved, fmt.layout_record(cfg, layout), reshardable(folder))
    return [message] if message else []


def startup_notes(cfg, layout) -> list[str]:
    """What ``mptk-train`` says before any process starts about the start of the run (after
    :func:`startup_problems` found none): the line of a resume at another layout."""
    decision = decide_for(cfg)
    if decision.source != RESUME or decision.problems:
        return []
    saved = fmt.saved_layout(decision.pool[0])
    changes = layout_changes(saved, fmt.layout_record(cfg, layout)) if saved else []
    return [relayout_line(changes)] if changes else []


# --------------------------------------------------------------------------- in the workers


@dataclass
class Plan:
    """The verified start of a worker: ``folder`` is the checkpoint to resume from (None: a
    fresh optimizer, maybe with ``init_from`` weights already loaded)."""

    folder: Optional[Path] = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    """A resume at another layout: what changes (the weights are already loaded; the optimizer
    state is resharded by :func:`restore`). Empty: DeepSpeed's own exact resume."""
    own_state: bool = False
    """The checkpoint holds no DeepSpeed state (its meta says so: experts split over ep ranks):
    weights and optimizer state come from mptk's own reshardable files, at any layout."""
    seed: int = 0
    """The run's ``train.seed``: a resume at another layout reseeds from it and the step."""
    device: str = "cpu"
    """The device type the run's RNG streams live on."""


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
    problems = checkpoint_problems(cfg.train, cfg.parallel.ep)
    decision = from_rank0(decide_for(cfg) if rank() == 0 else None)
    problems += list(decision.problems)
    if problems:
        raise CheckpointError("; ".join(problems))
    plan = first_intact(decision)
    if decision.source == RESUME:
        assert plan.folder is not None  # decide(): a RESUME pool is never empty; first_intact picks or raises
        _relayout(cfg, layout, model, plan)
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


def _relayout(cfg, layout, model: torch.nn.Module, plan: Plan) -> None:
    """A full resume from ``plan.folder``: refused when impossible; at another layout its
    weights loaded into ``model`` now and ``plan.changes`` set (the optimizer state follows in
    :func:`restore`)."""
    assert plan.folder is not None
    saved, now = plan.meta.get("layout", {}), fmt.layout_record(cfg, layout)
    parts = fmt.holds(plan.folder, plan.meta)
    message = shape_problem(plan.folder, cfg) or layout_problem(plan.folder, saved, now,
                                                                 parts[HOLDS_OPTIM])
    if message:
        raise CheckpointError(message)
    plan.changes = layout_changes(saved, now)
    plan.own_state = not parts[HOLDS_DEEPSPEED]
    if plan.changes or plan.own_state:
        from mptk.parallel import groups

        state.load_weights(state.chunks_of(model), plan.folder)
        plan.seed, plan.device = cfg.train.seed, groups.resolve_device(cfg.train.device).type
    if plan.changes:
        say(f"resharding {plan.folder} to this layout ({', '.join(plan.changes)}): weights "
            f"loaded, optimizer state next")


def restore(engine, plan: Plan) -> int:
    """After DeepSpeed exists: load the plan's checkpoint into ``engine`` and every rank's RNG.
    Returns the number of steps already done (0 without a checkpoint). The run's own follow-ups
    (LR, W&B, metrics) are :mod:`mptk.train.resume`'s."""
    if plan.folder is None:
        return 0
    step = int(plan.meta["step"])
    if not plan.changes and not plan.own_state:
        state.load_rank_state(engine, plan.folder, step)
        return step
    state.load_relayout_state(engine, plan.folder, step, plan.meta["layout"]["global_batch_size"])
    if not plan.changes:  # the same ranks: their own streams
        state.set_rng_state(torch.load(state.rng_file(plan.folder, rank()), weights_only=False))
        return step
    # Rank files belong to the saved layout's ranks: fresh streams, distinct from the seed's own.
    from mptk.parallel import groups

    groups.seed_model_parallel(plan.seed + step, torch.device(plan.device))
    return step
