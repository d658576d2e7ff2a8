"""Read W&B offline runs back from their files, with wandb's own reader.

wandb 0.31 no longer ships the Python reader of the ``.wandb`` transaction log
(``wandb.sdk.internal.datastore.DataStore`` is gone); the log is read by ``wandb-core``, the
same binary ``wandb sync`` uploads with. Its ``wandb leet inspect FILE --json`` prints every
record of the log as one JSON line (``{"num": .., "type": "history", "history": {...}}``),
which is what this module parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class OfflineRun:
    """One ``offline-run-<time>-<id>`` folder."""

    folder: Path
    run_id: str
    config: dict = field(default_factory=dict)
    """The run config as logged (``_wandb`` dropped)."""
    history: list[dict] = field(default_factory=list)
    """History rows in log order, as stored: the logged keys plus ``_step``, ``_runtime``..."""
    steps: list[int] = field(default_factory=list)
    """Each history record's step number (the record's ``step.num``), in log order."""
    exit_code: int | None = None


def offline_runs(run_dir) -> list[Path]:
    """``run_dir/wandb/offline-run-*`` in start order (the folder names begin with the time)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def records(wandb_file) -> list[dict]:
    """Every record of a ``.wandb`` file, decoded by wandb-core."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(wandb_file),
                          "--json"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"wandb leet inspect {wandb_file}: exit {out.returncode}\n"
                           f"{out.stdout}{out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def read(folder) -> OfflineRun:
    """The run id, config, history and exit code of one offline run folder."""
    folder = Path(folder)
    files = list(folder.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one run-*.wandb file, found {files}")
    run = OfflineRun(folder, run_id="")
    for rec in records(files[0]):
        kind, body = rec.get("type"), rec.get(rec.get("type"), {})
        if kind == "run":
            run.run_id = body["run_id"]
            run.config.update(_config(body.get("config", {})))
        elif kind == "config":
            run.config.update(_config(body))
        elif kind == "history":
            run.history.append(body.get("item", {}))
            run.steps.append(int(body.get("step", {}).get("num", -1)))
        elif kind == "exit":
            run.exit_code = int(body.get("exit_code", 0))
    return run


def _config(body: dict) -> dict:
    return {k: v for k, v in body.get("update", {}).items() if k != "_wandb"}
