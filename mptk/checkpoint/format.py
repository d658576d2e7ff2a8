"""The on-disk format of a checkpoint: names, ``meta.json``, the manifest, verification, the
atomic publish, pruning and the listing of candidates. Rules: ``docs/checkpoints.md``.

One checkpoint ``step_<8 digits>/`` holds ``weights/`` (megatron dist-checkpointing,
``torch_dist``: reshardable), ``deepspeed/`` (module, optimizer/ZeRO partitions and LR
scheduler: exact resume at the same layout), ``optim/`` (the optimizer state, reshardable),
``rng/rank_<r>.pt`` (every rank's RNG streams), ``meta.json`` (which also records whether
``deepspeed/`` and ``optim/`` were written: :func:`holds`), ``config.json`` and, written last,
``manifest.json`` (size and blake2b of every file). It is written as ``.tmp-step_…`` and
renamed when complete, then the ``latest`` pointer is replaced: a crash mid-save leaves the
previous checkpoint untouched.

What goes *into* ``weights/``, ``optim/``, ``deepspeed/`` and ``rng/`` is
:mod:`mptk.checkpoint.state`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional, cast

import torch

from mptk.checkpoint.ranks import gather, rank, world

FORMAT_VERSION = 1
CHECKPOINTS, LATEST, MANIFEST, META, CONFIG = (
    "checkpoints", "latest", "manifest.json", "meta.json", "config.json")
WEIGHTS, DEEPSPEED_TAG, RNG, OPTIM = "weights", "deepspeed", "rng", "optim"
HOLDS_DEEPSPEED, HOLDS_OPTIM = "deepspeed_state", "optim"
"""The ``meta.json`` keys recording whether a save wrote DeepSpeed's own state (``deepspeed/``)
and the reshardable optimizer state (``optim/``): :func:`holds`."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written, explained on one line."""


# --------------------------------------------------------------------------- small files


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and ``os.replace`` (a reader
    sees the old or the new content, never half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    """A JSON file as a dict."""
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict, indent: int = 2) -> None:
    """``data`` as JSON, atomically."""
    write_atomic(path, json.dumps(data, indent=indent) + "\n")


# --------------------------------------------------------------------------- names, listing


def step_name(step: int) -> str:
    """The folder name of checkpoint ``step``."""
    return f"step_{step:08d}"


def step_of(folder: Path) -> Optional[int]:
    """The step a published checkpoint folder is named after (None for anything else)."""
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoints_dir(run_dir) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def tmp_dir(root: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is published."""
    return root / f".tmp-{step_name(step)}"


def candidates(root: Path) -> list[Path]:
    """Published checkpoints under ``root``, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: cast(int, step_of(p)), reverse=True)  # None filtered out above


def read_latest(root: Path) -> Optional[str]:
    """The name ``latest`` points at (informational: resume takes the newest intact step)."""
    try:
        return (Path(root) / LATEST).read_text().strip()
    except OSError:
        return None


def resolve(path) -> list[Path]:
    """Checkpoints named by ``path``: a checkpoint, a ``checkpoints`` dir or a run dir."""
    path = Path(path).expanduser()
    if step_of(path) is not None or (path / MANIFEST).is_file() or (path / WEIGHTS).is_dir():
        return [path]
    return candidates(path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path)


# --------------------------------------------------------------------------- meta.json


def layout_record(cfg, layout) -> dict:
    """The layout ``meta.json`` records: the degrees of the run's one
    :class:`mptk.parallel.layout.Layout` plus the settings DeepSpeed's optimizer state is keyed
    to (``zero_stage``, ``dtype``) and the data position depends on (``global_batch_size``)."""
    return {**layout.degrees(), "stage_layers": list(layout.stage_layers),
            "zero_stage": cfg.zero.stage, "dtype": cfg.train.dtype.value,
            "global_batch_size": cfg.train.global_batch_size}


def parts_record(deepspeed_state: bool, optim: bool) -> dict:
    """What a save writes besides weights and RNG, as ``meta.json`` records it."""
    return {HOLDS_DEEPSPEED: bool(deepspeed_state), HOLDS_OPTIM: bool(optim)}


def meta_record(cfg, layout, step: int, wandb_run_id: Optional[str], parts: dict) -> dict:
    """The content of ``meta.json`` for checkpoint ``step``; ``parts`` from
    :func:`parts_record`."""
    return {"format_version": FORMAT_VERSION, "step": step,
            "consumed_samples": step * cfg.train.global_batch_size,
            "layout": layout_record(cfg, layout), "layout_line": layout.describe(),
            "recipe": cfg.model.recipe, "wandb_run_id": wandb_run_id, **parts,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}


def read_meta(folder: Path) -> Optional[dict]:
    """``folder``'s meta.json (None when unreadable)."""
    try:
        return read_json(Path(folder) / META)
    except (OSError, ValueError):
        return None


def saved_layout(folder: Path) -> Optional[dict]:
    """The layout recorded in ``folder``'s meta.json (None when unreadable)."""
    meta = read_meta(folder)
    return None if meta is None else meta.get("layout", {})


def holds(folder: Path, meta: Optional[dict] = None) -> dict[str, bool]:
    """Whether checkpoint ``folder`` (its meta.json, or ``meta``) holds DeepSpeed's own state
    and the reshardable optimizer state (:data:`HOLDS_DEEPSPEED`, :data:`HOLDS_OPTIM`), as the
    save recorded it. Meta written before that record: what the rules of then said (no
    DeepSpeed state with experts split over ep ranks; ``optim/`` where its metadata is)."""
    meta = (read_meta(folder) or {}) if meta is None else meta
    ep = int(meta.get("layout", {}).get("ep", 1))
    return {HOLDS_DEEPSPEED: bool(meta.get(HOLDS_DEEPSPEED, ep <= 1)),
            HOLDS_OPTIM: bool(meta.get(HOLDS_OPTIM, (Path(folder) / OPTIM / ".metadata").is_file()))}


# --------------------------------------------------------------------------- manifest


def file_digest(path: Path) -> str:
    """blake2b of a file (fsynced first: the manifest vouches for data on disk)."""
    digest = hashlib.blake2b(digest_size=32)
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(folder: Path) -> list[str]:
    """Files under ``folder`` (relative, sorted), the manifest left out."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def describe(folder: Path, names: list[str]) -> dict:
    """Size and blake2b per file, the work split over the ranks (a collective when distributed)."""
    mine = {n: {"size": (folder / n).stat().st_size, "blake2b": file_digest(folder / n)}
            for n in names[rank()::world()]}
    merged = {k: v for part in gather(mine) for k, v in part.items()}
    return {n: merged[n] for n in names}


def write_manifest(folder: Path, files: dict) -> None:
    """``manifest.json`` over ``files`` (from :func:`describe`): written last, it marks the
    checkpoint complete."""
    write_json(folder / MANIFEST, {"format_version": FORMAT_VERSION, "files": files}, indent=1)


def file_problems(folder: Path, name: str, want: dict) -> list[str]:
    """What is wrong with one file against its manifest entry."""
    path = folder / name
    if not path.is_file():
        return [f"{name}: missing"]
    size = path.stat().st_size
    if size != want["size"]:
        return [f"{name}: {size} bytes, manifest says {want['size']}"]
    if file_digest(path) != want["blake2b"]:
        return [f"{name}: content differs from the manifest (blake2b)"]
    return []


def verify(folder: Path) -> list[str]:
    """Problems of checkpoint ``folder`` ([] = complete and intact); a collective when
    distributed (each rank hashes a share of the files)."""
    folder = Path(folder)
    try:
        files = read_json(folder / MANIFEST)["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{MANIFEST} missing or unreadable ({type(err).__name__}): the save never finished"]
    names = sorted(files)
    mine = [p for n in names[rank()::world()] for p in file_problems(folder, n, files[n])]
    parts = gather(mine)
    return mine if len(parts) == 1 else sorted(p for part in parts for p in part)


def structure_problems(folder: Path, world_size: int) -> list[str]:
    """Parts a finished save must have, checked before the manifest is written."""
    problems = [f"{part} missing" for part in (META, CONFIG, f"{WEIGHTS}/.metadata")
                if not (folder / part).is_file()]
    rng = len(list((folder / RNG).glob("rank_*.pt")))
    if rng != world_size:
        problems.append(f"{RNG}/ holds {rng} rank files, expected {world_size}")
    parts = holds(folder)
    if parts[HOLDS_DEEPSPEED] and not list((folder / DEEPSPEED_TAG).glob("*model_states.pt")):
        problems.append(f"{DEEPSPEED_TAG}/ holds no model states")
    if parts[HOLDS_OPTIM] and not (folder / OPTIM / ".metadata").is_file():
        problems.append(f"{OPTIM}/.metadata missing")
    if not any(parts.values()):
        problems.append(f"neither {DEEPSPEED_TAG}/ nor {OPTIM}/ written: no optimizer state")
    return problems


# --------------------------------------------------------------------------- publish, prune


def clean_stale(root: Path) -> None:
    """Delete leftovers of interrupted saves and replacements (rank 0)."""
    for stale in list(root.glob(".tmp-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(stale, ignore_errors=True)


def start_tmp(root: Path, tmp: Path) -> None:
    """An empty ``tmp`` with the sub-folders every rank writes into (rank 0, before a barrier)."""
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    for sub in (WEIGHTS, RNG):
        (tmp / sub).mkdir(parents=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final`` (an older copy moved aside), flip ``latest``."""
    trash = final.with_name(f".trash-{final.name}")
    if final.exists():
        os.rename(final, trash)
    os.rename(tmp, final)
    write_atomic(final.parent / LATEST, final.name + "\n")
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 = keep all); returns the deleted."""
    old = candidates(root)[keep:] if keep > 0 else []
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint so it is neither retried nor overwritten (rank 0 only)."""
    target = folder.with_name(f"{folder.name}.damaged-{int(time.time())}")
    os.rename(folder, target)
    return target
