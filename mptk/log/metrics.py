"""Metrics out: one console line per interval (rank 0), ``metrics.jsonl`` in the run dir,
and W&B (offline by default, its files under the run dir)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from mptk.config.schema import RunConfig, WandbMode


def jsonable(value: Any) -> Any:
    """Config values as plain JSON (Enums by value)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return getattr(value, "value", value)


def config_dict(cfg: RunConfig) -> dict:
    return jsonable(asdict(cfg))


def format_line(row: dict) -> str:
    """``step 10/300 | loss 5.1234 | lr 1.0e-03 | ...`` from a metrics row."""
    parts = [f"step {row['step']}/{row['steps']}"]
    fmt = {"loss": "{:.4f}", "eval_loss": "{:.4f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
           "eval_top1": "{:.3f}", "tokens_per_s": "{:,.0f}", "images_per_s": "{:,.1f}",
           "bubble_measured": "{:.2f}", "bubble_theory": "{:.2f}", "step_time_s": "{:.3f}", "rss_mb": "{:,.0f}"}
    for key, pattern in fmt.items():
        if row.get(key) is not None:
            parts.append(f"{key} {pattern.format(row[key])}")
    return " | ".join(parts)


class Metrics:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(self, cfg: RunConfig, active: bool, printer=print):
        self.active, self.printer, self.wandb = active, printer, None
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        if active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.wandb = _wandb_run(cfg)

    def log(self, row: dict, console: bool = True) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            self.printer(format_line(row))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "steps"}, step=row["step"])

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (None when W&B is off, and on ranks other than 0); checkpoints keep
        it so a resumed run continues the same W&B run."""
        return self.wandb.id if self.wandb is not None else None

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(cfg: RunConfig) -> Optional[Any]:
    """A W&B run writing under ``run_dir/wandb`` (offline unless ``log.wandb.mode=online``)."""
    settings = cfg.log.wandb
    if settings.mode is WandbMode.disabled:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=settings.project, entity=settings.entity,
                      name=settings.name or Path(cfg.run_dir).name, dir=cfg.run_dir,
                      mode=settings.mode.value, config=config_dict(cfg))
