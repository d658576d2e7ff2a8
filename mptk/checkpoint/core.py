"""Checkpoints: atomic saves into ``run_dir/checkpoints``, a manifest to verify them, resume,
weights-only starts at any tp/pp layout, pruning. Layout and rules: ``docs/checkpoints.md``.

One checkpoint ``step_<8 digits>/`` holds ``weights/`` (megatron dist-checkpointing,
``torch_dist``: reshardable), ``deepspeed/`` (DeepSpeed's module, optimizer/ZeRO partitions
and LR scheduler: exact resume at the same layout), ``rng/rank_<r>.pt`` (every rank's RNG
streams), ``meta.json``, ``config.json`` and, written last, ``manifest.json`` (size and
blake2b of every file). It is written as ``.tmp-step_…`` and renamed when complete, then the
``latest`` pointer is replaced: a crash mid-save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mptk.config.checks import checkpoint_problems
from mptk.train import signals

FORMAT_VERSION = 1
CHECKPOINTS, LATEST, MANIFEST, META, CONFIG = (
    "checkpoints", "latest", "manifest.json", "meta.json", "config.json")
WEIGHTS, DEEPSPEED_TAG, RNG = "weights", "deepspeed", "rng"
CRASH_ENV = "MPTK_TEST_CRASH_IN_SAVE"
"""Test hook: ``R`` or ``R@S`` makes rank R SIGKILL itself in the middle of a save (of step S)."""
RESUME_KEYS = ("tp", "pp", "vpp", "dp", "zero_stage", "dtype", "global_batch_size")
"""What must match for a full resume (DeepSpeed's optimizer state is not reshardable here)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written, explained on one line."""


# --------------------------------------------------------------------------- small helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _say(text: str) -> None:
    if _rank() == 0:
        print(f"mptk: {text}", flush=True)


def _warn(text: str) -> None:
    if _rank() == 0:
        print(f"mptk: warning: {text}", file=sys.stderr, flush=True)


def _from_rank0(value):
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def chunks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model chunks of this rank (a ModuleList holds virtual-pipeline chunks)."""
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


# --------------------------------------------------------------------------- names, listing


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> Optional[int]:
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def candidates(root: Path) -> list[Path]:
    """Published checkpoints under ``root``, newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


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
            for n in names[_rank()::_world()]}
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * _world()
        dist.all_gather_object(parts, mine)
    merged = {k: v for part in parts for k, v in part.items()}
    return {n: merged[n] for n in names}


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
    mine = [p for n in names[_rank()::_world()] for p in file_problems(folder, n, files[n])]
    if not dist.is_initialized():
        return mine
    parts = [None] * _world()
    dist.all_gather_object(parts, mine)
    return sorted(p for part in parts for p in part)


def structure_problems(folder: Path, world: int) -> list[str]:
    """Parts a finished save must have, checked before the manifest is written."""
    problems = [f"{part} missing" for part in (META, CONFIG, f"{WEIGHTS}/.metadata")
                if not (folder / part).is_file()]
    rng = len(list((folder / RNG).glob("rank_*.pt")))
    if rng != world:
        problems.append(f"{RNG}/ holds {rng} rank files, expected {world}")
    if not list((folder / DEEPSPEED_TAG).glob("*model_states.pt")):
        problems.append(f"{DEEPSPEED_TAG}/ holds no model states")
    return problems


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG stream of this rank: torch CPU (+CUDA), megatron's tracker, python, numpy."""
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(),
             "tracker": {k: v.clone() for k, v in
                         tensor_parallel.get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- weights (dist-ckpt)


def sharded_weights(chunks: list[torch.nn.Module]) -> dict:
    """megatron's sharded state dict per chunk (tensor keys hold global layer numbers, so a
    checkpoint loads at any tp/pp); a fresh ``metadata`` dict per call."""
    from megatron.core.transformer.utils import sharded_state_dict_default

    return {f"chunk{i}": sharded_state_dict_default(c, prefix="", metadata={})
            for i, c in enumerate(chunks)}


def _gathered(chunks: list[torch.nn.Module], zero_stage: int):
    """ZeRO-3 holds parameter partitions: gather them (read-only) for the save."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for c in chunks for p in c.parameters()])


def _local_results_queue() -> None:
    """``torch_dist`` writes through processes forked from this one; the save function itself
    runs here (synchronous save) and hands their results to a global queue that megatron makes
    a Manager queue, which *spawns* a server process (seconds: it re-imports the entry point)
    that would outlive a hard exit. An in-process queue does the same job here."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_weights(chunks: list[torch.nn.Module], folder: Path, zero_stage: int) -> None:
    """Model weights through dist-checkpointing (``torch_dist``) into existing ``folder``."""
    from megatron.core import dist_checkpointing

    _local_results_queue()
    with _gathered(chunks, zero_stage):
        dist_checkpointing.save(sharded_weights(chunks), str(folder))
    end_write_helpers()


def load_weights(chunks: list[torch.nn.Module], folder: Path) -> None:
    """Weights of checkpoint ``folder`` into ``chunks`` (any saved tp/pp; a collective)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_weights(chunks), str(Path(folder) / WEIGHTS))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"], strict=True)


def end_write_helpers() -> None:
    """Drop the results queue; shut down its Manager process if megatron started one (it
    would outlive the worker's hard exit and hold its stdout open)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue, filesystem_async._results_queue = filesystem_async._results_queue, None
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()


# --------------------------------------------------------------------------- save


def layout_dict(cfg, layout) -> dict:
    """The layout a full resume must match (see ``RESUME_KEYS``)."""
    return {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "dp": layout.dp,
            "world": layout.world, "zero_stage": cfg.zero.stage, "dtype": cfg.train.dtype.value,
            "global_batch_size": cfg.train.global_batch_size}


def meta(w, step: int) -> dict:
    return {"format_version": FORMAT_VERSION, "step": step,
            "consumed_samples": step * w.cfg.train.global_batch_size,
            "layout": layout_dict(w.cfg, w.layout), "recipe": w.cfg.model.recipe,
            "wandb_run_id": getattr(w.metrics, "run_id", None),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}


def _clean_stale(root: Path) -> None:
    """Leftovers of interrupted saves and replacements (rank 0)."""
    for stale in list(root.glob(".tmp-*")) + list(root.glob(".trash-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _start(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    for sub in (WEIGHTS, RNG):
        (tmp / sub).mkdir(parents=True)


def _crash_hook(step: int) -> None:
    """``MPTK_TEST_CRASH_IN_SAVE=R[@S]``: rank R dies by SIGKILL mid-save (tests)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    rank, _, at = spec.partition("@")
    if int(rank) == _rank() and (not at or int(at) == step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_parts(w, step: int, tmp: Path) -> None:
    """Every rank's share: weights, DeepSpeed state, its RNG; rank 0 adds meta and config."""
    from mptk.log.metrics import config_dict

    save_weights(chunks_of(w.engine.module), tmp / WEIGHTS, w.cfg.zero.stage)
    client = {"step": step, "consumed_samples": step * w.cfg.train.global_batch_size}
    w.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state=client, save_latest=False)
    torch.save(rng_state(), tmp / RNG / f"rank_{_rank():05d}.pt")
    _crash_hook(step)
    if _rank() == 0:
        write_atomic(tmp / META, json.dumps(meta(w, step), indent=2) + "\n")
        write_atomic(tmp / CONFIG, json.dumps(config_dict(w.cfg), indent=2) + "\n")


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


def save(w, step: int) -> Path:
    """Write checkpoint ``step`` of worker ``w`` atomically (every rank calls it)."""
    start, root = time.perf_counter(), checkpoints_dir(w.cfg.run_dir)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if _rank() == 0:
        _start(root, tmp)
    _barrier()
    _write_parts(w, step, tmp)
    _barrier()
    problems = _from_rank0(structure_problems(tmp, _world()) if _rank() == 0 else None)
    if problems:
        raise CheckpointError(f"checkpoint {tmp} is incomplete: {'; '.join(problems)}")
    files = describe(tmp, _from_rank0(listing(tmp) if _rank() == 0 else None))
    if _rank() == 0:
        write_atomic(tmp / MANIFEST, json.dumps({"format_version": FORMAT_VERSION,
                                                 "files": files}, indent=1) + "\n")
        publish(tmp, final)
        prune(root, w.cfg.train.keep_last)
    _barrier()
    _say(f"saved checkpoint {final} in {time.perf_counter() - start:.1f}s")
    return final


def due(train_cfg, step: int) -> bool:
    """Whether ``train.save_interval`` asks for a checkpoint after ``step``."""
    interval = train_cfg.save_interval
    if interval < 0:
        return False
    return step == train_cfg.steps or (interval > 0 and step % interval == 0)


def maybe_save(w, step: int) -> bool:
    """After optimizer step ``step`` (all ranks): save when due or when any rank got a stop
    signal. True means stop now (a signal arrived before the last step)."""
    signals.test_hook(step, _rank())
    stop = signals.agree_stop()
    if stop or due(w.cfg.train, step):
        save(w, step)
    return stop and step < w.cfg.train.steps


# --------------------------------------------------------------------------- resume


@dataclass
class Plan:
    """What :func:`restore` loads: a full checkpoint (``folder``) or nothing."""

    folder: Optional[Path] = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _set_aside(folder: Path) -> None:
    """Rename a damaged checkpoint of this run (rank 0) so it is neither retried nor overwritten."""
    if _rank() == 0:
        os.rename(folder, folder.with_name(f"{folder.name}.damaged-{int(time.time())}"))


def first_intact(pool: list[Path], own: bool) -> Plan:
    """The first checkpoint of ``pool`` that verifies; a warning names each damaged one."""
    plan = Plan()
    for folder in pool:
        problems = verify(folder)
        if not problems:
            plan.folder, plan.meta = folder, read_json(folder / META)
            return plan
        text = f"checkpoint {folder} is damaged ({'; '.join(problems[:3])}); trying an older one"
        plan.warnings.append(text)
        _warn(text + ("; moved aside as *.damaged-*" if own else ""))
        if own:
            _set_aside(folder)
    if pool:
        raise CheckpointError(f"train.resume: no intact checkpoint among {[str(p) for p in pool]}; "
                              f"repair or move them, or start a new hydra.run.dir")
    return plan


def choose(cfg) -> Plan:
    """The checkpoint to resume from (rank 0 lists, every rank verifies a share)."""
    resume, own = str(cfg.train.resume), candidates(checkpoints_dir(cfg.run_dir))
    own = _from_rank0(own)
    if resume == "none":
        if own:
            raise CheckpointError(f"train.resume=none but {own[0]} exists; use a new "
                                  f"hydra.run.dir, delete {own[0].parent} or train.resume=auto")
        return Plan()
    if own or resume == "auto":
        return first_intact(own, own=True)
    pool = _from_rank0(resolve(resume))
    if not pool:
        raise CheckpointError(f"train.resume={resume}: no checkpoint there; give a checkpoint, "
                              f"its checkpoints dir or its run dir")
    return first_intact(pool, own=False)


def layout_message(folder: Path, saved: dict, now: dict) -> Optional[str]:
    """One line when a full resume from ``folder`` (saved with ``saved``) cannot run as ``now``."""
    diff = [f"{k} {saved.get(k)}->{now[k]}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if not diff:
        return None
    return (f"train.resume: {folder} was saved with another layout ({', '.join(diff)}); "
            f"a full resume needs the same one: restore it, or start a new hydra.run.dir with "
            f"train.init_from={folder} (its weights, a fresh optimizer)")


def check_layout(plan: Plan, now: dict) -> None:
    """A full resume needs the saved layout; otherwise one line pointing at init_from."""
    message = layout_message(plan.folder, plan.meta.get("layout", {}), now)
    if message:
        raise CheckpointError(message)


def init_weights(cfg, model: torch.nn.Module) -> Path:
    """Load ``train.init_from`` weights into ``model`` (any saved tp/pp); returns the folder."""
    pool = _from_rank0(resolve(cfg.train.init_from))
    plan = first_intact(pool, own=False) if pool else Plan()
    if plan.folder is None:
        raise CheckpointError(f"train.init_from={cfg.train.init_from}: no checkpoint there; "
                              f"give a checkpoint, its checkpoints dir or its run dir")
    load_weights(chunks_of(model), plan.folder)
    _say(f"initialised weights from {plan.folder} (step {plan.meta.get('step')}); fresh optimizer")
    return plan.folder


def prepare(cfg, layout, model: torch.nn.Module) -> Plan:
    """Before DeepSpeed takes ``model``: pick the checkpoint to resume from, or else load
    ``train.init_from`` weights into ``model``. A collective."""
    problems = checkpoint_problems(cfg.train)
    if problems:
        raise CheckpointError("; ".join(problems))
    plan = choose(cfg)
    if plan.folder is not None:
        check_layout(plan, layout_dict(cfg, layout))
    elif cfg.train.init_from:
        init_weights(cfg, model)
    return plan


def resume_wandb(plan: Plan) -> None:
    """The next W&B run continues the saved one (rank 0 creates it after this)."""
    run_id = plan.meta.get("wandb_run_id")
    if run_id and _rank() == 0:
        os.environ["WANDB_RUN_ID"] = run_id
        os.environ.setdefault("WANDB_RESUME", "allow")


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


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except ValueError:
        return float("inf")  # a line cut short by a crash


def trim_metrics(run_dir, step: int) -> None:
    """Drop ``metrics.jsonl`` rows after ``step``: work lost with the stopped run (rank 0)."""
    path = Path(run_dir) / "metrics.jsonl"
    if _rank() != 0 or not path.is_file():
        return
    rows = path.read_text().splitlines()
    keep = [r for r in rows if _row_step(r) <= step]
    if len(keep) != len(rows):
        write_atomic(path, "".join(r + "\n" for r in keep))


def restore(engine, plan: Plan, run_dir) -> int:
    """After DeepSpeed exists: load the plan's checkpoint (module, optimizer, scheduler, RNG of
    every rank). Returns the number of steps already done (0 without a checkpoint)."""
    if plan.folder is None:
        return 0
    path, client = engine.load_checkpoint(str(plan.folder), tag=DEEPSPEED_TAG,
                                          load_module_strict=True)
    step = int(plan.meta["step"])
    if path is None or int((client or {}).get("step", -1)) != step:
        raise CheckpointError(f"train.resume: DeepSpeed could not load {plan.folder}/"
                              f"{DEEPSPEED_TAG} at step {step}; move that checkpoint aside")
    set_rng_state(torch.load(plan.folder / RNG / f"rank_{_rank():05d}.pt", weights_only=False))
    recompute_lr(engine)
    resume_wandb(plan)
    trim_metrics(run_dir, step)
    _say(f"resumed from {plan.folder} at step {step} "
         f"({plan.meta.get('consumed_samples')} samples consumed)")
    return step
