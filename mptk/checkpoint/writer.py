"""Writing one checkpoint: every rank's share into a temporary folder, then (rank 0) the
structure check, the manifest the ranks hash between them, the atomic publish and pruning.
When to save is :func:`due` here; stop signals are the run's (:mod:`mptk.train.resume`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mptk.checkpoint import format as fmt
from mptk.checkpoint import state
from mptk.checkpoint.ranks import barrier, from_rank0, rank, say, world

CRASH_ENV = "MPTK_TEST_CRASH_IN_SAVE"
"""Test hook: ``R`` or ``R@S`` makes rank R SIGKILL itself in the middle of a save (of step S)."""


def due(train_cfg, step: int) -> bool:
    """Whether ``train.save_interval`` asks for a checkpoint after ``step``."""
    interval = train_cfg.save_interval
    if interval < 0:
        return False
    return step == train_cfg.steps or (interval > 0 and step % interval == 0)


def _crash_hook(step: int) -> None:
    """``MPTK_TEST_CRASH_IN_SAVE=R[@S]``: rank R dies by SIGKILL mid-save (tests)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    who, _, at = spec.partition("@")
    if int(who) == rank() and (not at or int(at) == step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_parts(w, step: int, tmp: Path) -> None:
    """Every rank's share (:func:`mptk.checkpoint.state.save_rank_state`); rank 0 adds
    ``meta.json`` (with the parts written) and ``config.json``."""
    from mptk.log.metrics import config_dict

    cfg = w.cfg
    parts = state.parts_to_write(w.engine, cfg.train.save_reshardable_optim)
    state.save_rank_state(w.engine, tmp, step, cfg.train.global_batch_size, cfg.zero.stage,
                          parts)
    _crash_hook(step)
    if rank() == 0:  # the meta records what was written: resume reads that, not the rules
        run_id = getattr(w.metrics, "run_id", None)
        fmt.write_json(tmp / fmt.META, fmt.meta_record(cfg, w.layout, step, run_id, parts))
        fmt.write_json(tmp / fmt.CONFIG, config_dict(cfg))


def save(w, step: int) -> Path:
    """Write checkpoint ``step`` of worker ``w`` (its ``cfg``, ``layout``, ``engine`` and
    ``metrics``) atomically; every rank calls it."""
    start, root = time.perf_counter(), fmt.checkpoints_dir(w.cfg.run_dir)
    final, tmp = root / fmt.step_name(step), fmt.tmp_dir(root, step)
    if rank() == 0:
        fmt.start_tmp(root, tmp)
    barrier()
    _write_parts(w, step, tmp)
    barrier()
    problems = from_rank0(fmt.structure_problems(tmp, world()) if rank() == 0 else None)
    if problems:
        raise fmt.CheckpointError(f"checkpoint {tmp} is incomplete: {'; '.join(problems)}")
    files = fmt.describe(tmp, from_rank0(fmt.listing(tmp) if rank() == 0 else None))
    if rank() == 0:
        fmt.write_manifest(tmp, files)
        fmt.publish(tmp, final)
        fmt.prune(root, w.cfg.train.keep_last)
    barrier()
    say(f"saved checkpoint {final} in {time.perf_counter() - start:.1f}s")
    return final
