"""Metrics out: one console line per interval (rank 0), ``metrics.jsonl`` in the run dir,
W&B (offline by default, its files under the run dir) and, with ``log.tensorboard=true``,
TensorBoard event files under ``run_dir/tensorboard`` (:mod:`mptk.log.tensorboard`)."""

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


FORMATS = {"loss": "{:.4f}", "eval_loss": "{:.4f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
           "loss_scale": "{:g}", "eval_top1": "{:.3f}", "tokens_per_s": "{:,.0f}",
           "images_per_s": "{:,.1f}", "tflops_per_device": "{:.3g}", "mfu": "{:.3f}",
           "bubble_measured": "{:.2f}", "bubble_theory": "{:.2f}", "step_time_s": "{:.3f}",
           "rss_mb": "{:,.0f}", "mem_peak_mb": "{:,.0f}", "mem_reserved_mb": "{:,.0f}",
           "moe_aux_loss": "{:.3f}", "moe_load_min": "{:.2f}", "moe_load_max": "{:.2f}"}
"""Console formats of the metrics line, in order (``metrics.jsonl`` and W&B keep every key)."""

SHORT_PHASES = {"data": "data", "forward": "fwd", "backward": "bwd", "grad_reduce": "reduce",
                "optimizer": "opt", "p2p_wait": "p2p"}


def format_line(row: dict) -> str:
    """``step 10/300 | loss 5.1234 | lr 1.0e-03 | ...`` from a metrics row."""
    parts = [f"step {row['step']}/{row['steps']}"]
    for key, pattern in FORMATS.items():
        if row.get(key) is not None:
            parts.append(f"{key} {pattern.format(row[key])}")
    if row.get("eta_s") is not None:
        from mptk.log.progress import format_eta

        parts.append(f"eta {format_eta(row['eta_s'])}")
    return " | ".join(parts + _phase_parts(row))


def _phase_parts(row: dict) -> list[str]:
    """``s/step max(min) fwd 0.020(0.018) ... | straggler rank 3`` when phase times are in."""
    if "straggler_rank" not in row:
        return []
    times = " ".join(f"{short} {row[f'{name}_s_max']:.3f}({row[f'{name}_s_min']:.3f})"
                     for name, short in SHORT_PHASES.items() if f"{name}_s_max" in row)
    return [f"s/step max(min) {times}", f"straggler rank {row['straggler_rank']}"]


class Metrics:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(self, cfg: RunConfig, active: bool, printer=print, layout=None,
                 rank_printer=None, start_step: int = 0):
        self.active, self.printer, self.wandb, self.tensorboard = active, printer, None, None
        self.rank_printer = rank_printer  # where ranks other than 0 print (their rank log)
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        if active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            meta = run_meta(layout)
            (self.path.parent / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            self.wandb = _wandb_run(cfg, meta)
            self.tensorboard = _tensorboard(cfg, start_step)

    def log(self, row: dict, console: bool = True) -> None:
        if not self.active:
            if console and self.rank_printer is not None:
                self.rank_printer(format_line(row))
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if console:
            self.printer(format_line(row))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "steps"}, step=row["step"])
        if self.tensorboard is not None:
            self.tensorboard.log(row, flush=console)

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (None when W&B is off, and on ranks other than 0); checkpoints keep
        it so a resumed run continues the same W&B run."""
        return self.wandb.id if self.wandb is not None else None

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def git_revision() -> Optional[str]:
    """``git rev-parse HEAD`` of the mptk source tree, or None outside a checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict:
    """Installed versions of the packages a run depends on."""
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in ("torch", "megatron-core", "deepspeed", "mptk"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_meta(layout=None) -> dict:
    """Logged once per run (W&B config ``meta``, ``run_dir/meta.json``): git revision, package
    versions and the parallel layout."""
    shape = None
    if layout is not None:
        shape = {k: getattr(layout, k) for k in ("world", "tp", "pp", "dp", "vpp", "grad_acc")
                 if hasattr(layout, k)}
    return {"git_revision": git_revision(), "versions": versions(), "layout": shape}


def _wandb_run(cfg: RunConfig, meta: Optional[dict] = None) -> Optional[Any]:
    """A W&B run writing under ``run_dir/wandb`` (offline unless ``log.wandb.mode=online``)."""
    settings = cfg.log.wandb
    if settings.mode is WandbMode.disabled:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=settings.project, entity=settings.entity,
                      name=settings.name or Path(cfg.run_dir).name, dir=cfg.run_dir,
                      mode=settings.mode.value,
                      config={**config_dict(cfg), "meta": meta or {}})


def _tensorboard(cfg: RunConfig, start_step: int) -> Optional[Any]:
    """A TensorBoard writer under ``run_dir/tensorboard`` when ``log.tensorboard``."""
    if not cfg.log.tensorboard:
        return None
    from mptk.log.tensorboard import TensorBoardSink

    return TensorBoardSink(cfg.run_dir, purge_step=start_step)
