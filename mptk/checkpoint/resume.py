"""Checkpoint settings checked by ``mptk-train`` before any process starts (the file system
only; the workers verify the checkpoint they pick again, see :mod:`mptk.checkpoint.core`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mptk.checkpoint.core import (META, candidates, checkpoints_dir, layout_dict,
                                   layout_message, read_json, resolve)


def startup_problems(cfg, layout=None) -> list[str]:
    """``resume=none`` over existing checkpoints, a ``resume``/``init_from`` path holding no
    checkpoint, and (given the layout) a full resume at another layout: one line each."""
    resume, own = str(cfg.train.resume), candidates(checkpoints_dir(cfg.run_dir))
    problems = []
    if resume == "none" and own:
        problems.append(f"train.resume=none but {own[0]} exists; use a new hydra.run.dir, "
                        f"delete {own[0].parent} or train.resume=auto")
    if resume not in ("none", "auto") and not own and not resolve(resume):
        problems.append(f"train.resume={resume}: no checkpoint there; give a checkpoint, its "
                        f"checkpoints dir or its run dir")
    if cfg.train.init_from and not resolve(cfg.train.init_from):
        problems.append(f"train.init_from={cfg.train.init_from}: no checkpoint there; give a "
                        f"checkpoint, its checkpoints dir or its run dir")
    if layout is not None and not problems:
        problems += _layout_problems(cfg, layout)
    return problems


def resume_candidate(cfg) -> Optional[Path]:
    """The newest checkpoint a resume would start from (the run's own first)."""
    resume, own = str(cfg.train.resume), candidates(checkpoints_dir(cfg.run_dir))
    if resume == "none":
        return None
    if own:
        return own[0]
    pool = resolve(resume) if resume != "auto" else []
    return pool[0] if pool else None


def _layout_problems(cfg, layout) -> list[str]:
    folder = resume_candidate(cfg)
    try:
        saved = read_json(folder / META).get("layout", {}) if folder else None
    except (OSError, ValueError):
        return []  # unreadable: the workers fall back to an older intact checkpoint
    message = layout_message(folder, saved, layout_dict(cfg, layout)) if saved else None
    return [message] if message else []
