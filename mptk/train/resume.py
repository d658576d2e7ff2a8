"""A worker's checkpoint policy: when to save (schedule and stop signals) and what a resume
changes beyond the checkpoint's own state (the LR under this run's schedule, the W&B run, the
metrics rows of the lost steps). The checkpoint itself is :mod:`mptk.checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mptk import checkpoint
from mptk.checkpoint.format import write_atomic
from mptk.checkpoint.ranks import rank, say
from mptk.train import signals


def prepare(cfg, layout, model: torch.nn.Module) -> checkpoint.Plan:
    """Before DeepSpeed takes ``model``: pick the checkpoint to resume from or load
    ``train.init_from`` weights (:func:`mptk.checkpoint.resume.prepare`; a collective)."""
    return checkpoint.prepare(cfg, layout, model)


def restore(engine, plan: checkpoint.Plan, run_dir) -> int:
    """After DeepSpeed exists: load the plan's checkpoint, then bring the run in line with it.
    Returns the number of steps already done (0 without a checkpoint)."""
    step = checkpoint.restore(engine, plan)
    if plan.folder is None:
        return 0
    recompute_lr(engine)
    resume_wandb(plan.meta.get("wandb_run_id"))
    trim_metrics(run_dir, step)
    say(f"resumed from {plan.folder} at step {step} "
        f"({plan.meta.get('consumed_samples')} samples consumed)")
    return step


def maybe_save(w, step: int) -> bool:
    """After optimizer step ``step`` (all ranks): save when due or when any rank got a stop
    signal. True means stop now (a signal arrived before the last step)."""
    stop = signals.agree_stop()
    if stop or checkpoint.due(w.cfg.train, step):
        checkpoint.save(w, step)
    return stop and step < w.cfg.train.steps


def recompute_lr(engine) -> None:
    """The LR at the restored position under *this* run's schedule: the loaded optimizer holds
    the saved run's last LR, which is wrong for the next step when ``train.steps`` changed."""
    sched = engine.lr_scheduler
    if sched is None or not hasattr(sched, "lr_lambdas"):
        return
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def resume_wandb(run_id) -> None:
    """The next W&B run continues the saved one (rank 0 creates it after this)."""
    if run_id and rank() == 0:
        os.environ["WANDB_RUN_ID"] = run_id
        os.environ.setdefault("WANDB_RESUME", "allow")


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except ValueError:
        return float("inf")  # a line cut short by a crash


def trim_metrics(run_dir, step: int) -> None:
    """Drop ``metrics.jsonl`` rows after ``step``: work lost with the stopped run (rank 0)."""
    path = Path(run_dir) / "metrics.jsonl"
    if rank() != 0 or not path.is_file():
        return
    rows = path.read_text().splitlines()
    keep = [r for r in rows if _row_step(r) <= step]
    if len(keep) != len(rows):
        write_atomic(path, "".join(r + "\n" for r in keep))
