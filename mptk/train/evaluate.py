"""Held-out evaluation of a checkpoint (``mptk-eval``), at any tp/pp/cp layout.

No second eval loop: a rank sets up exactly as a training worker does
(:func:`mptk.train.trainer.setup`, the checkpoint's weights loaded as ``train.init_from`` in a
scratch run dir) and runs the run's own step strategy's ``evaluate`` (the pp=1 engine eval or
the forward-only pipeline schedule), the code that wrote ``eval_loss`` into ``metrics.jsonl``.

The held-out set is the run's: ranks together cover the first
``eval_batches x micro_batch_size x dp`` samples of the valid split whatever the dp size
(:func:`mptk.data.indexed.fixed_batches`), so :func:`same_samples` keeps that product when the
layout changes dp, and the loss equals the run's last ``eval_loss`` within float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mptk.checkpoint.format import CheckpointError


@dataclass(kw_only=True, slots=True)
class Result:
    """What ``mptk-eval`` reports (equal on every rank)."""

    eval_loss: float
    """Mean next-token cross-entropy over the held-out tokens (nats)."""
    perplexity: float
    """``exp(eval_loss)``."""
    tokens: int
    """Held-out tokens scored (every dp x cp rank's share)."""
    samples: int
    """Held-out samples (sequences) scored."""
    layout: str
    """The layout it ran at (``Layout.describe``)."""


def same_samples(cfg: Any, total: int, dp: int) -> list[str]:
    """Keep the run's ``total`` held-out samples (its ``eval_batches x micro x dp``) at this
    ``dp``: sets ``cfg.train.eval_batches``; one line when no whole number of batches does."""
    per_batch = cfg.train.micro_batch_size * dp
    if total % per_batch:
        return [f"train.eval_batches: the run's held-out set is {total} samples, not a whole "
                f"number of batches of micro {cfg.train.micro_batch_size} x dp {dp}; set "
                f"train.eval_batches (another held-out set) or another layout"]
    cfg.train.eval_batches = total // per_batch
    return []


def scratch(cfg: Any, checkpoint: str, run_dir: str) -> Any:
    """``cfg`` as a weights-only start from ``checkpoint`` in ``run_dir``, writing nothing
    elsewhere (no W&B, TensorBoard, progress bar or profiler)."""
    from mptk.config.schema import WandbMode

    cfg.run_dir = run_dir
    cfg.train.resume, cfg.train.init_from = "none", str(checkpoint)
    cfg.log.wandb.mode = WandbMode.disabled
    cfg.log.tensorboard = False
    cfg.log.progress = False
    return cfg


def run(env, cfg: Any) -> Result:
    """A rank of ``mptk-eval``: the trainer's setup, then its held-out eval (a collective)."""
    from mptk.log.noise import quiet
    from mptk.train.step import dp_sums
    from mptk.train.trainer import one_eval, setup

    quiet()
    w = setup(cfg, env)
    if w.start_step:  # a resume would mean the scratch run dir held checkpoints
        raise CheckpointError(f"{cfg.run_dir}: not an empty scratch run dir")
    metrics = one_eval(w)
    batches = w.data.eval_batches()  # type: ignore[attr-defined]
    counts = dp_sums({"tokens": sum(int(b["labels"].numel()) for b in batches),
                      "samples": sum(int(b["labels"].shape[0]) for b in batches)})
    samples = int(counts["samples"]) // max(w.layout.cp, 1)  # cp ranks share a sample
    loss = float(metrics["eval_loss"])
    return Result(eval_loss=loss, perplexity=math.exp(loss), tokens=int(counts["tokens"]),
                  samples=samples, layout=w.layout.describe())
