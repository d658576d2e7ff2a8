"""Start N local ranks and collect what each one returns.

One runner for every "spawn a world on this machine" in mptk: the training workers of a bare
``mptk-train`` (:mod:`mptk.launch.local`), ``mptk-bench``'s variants
(:mod:`mptk.launch.bench`), the planner's calibration (:mod:`mptk.launch.measure`) and the
multi-process tests. Each rank is a fresh process of torch's multiprocessing ``spawn``
context (CUDA and gloo do not survive a fork) and gets its :class:`DistEnv`: rank, world,
master address and one free port shared by the world.

    results = run(fn, world, *args, timeout=600)   # fn(env, *args) on every rank, in rank order

A rank that fails (an exception, a non-zero exit, a signal) stops the others, which would
otherwise wait for it in a collective; :func:`run` then raises :class:`RankError`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mptk.log.noise import quiet
from mptk.parallel.env import DistEnv

# A spawned rank imports this module first (it holds the process target), before its
# arguments pull in megatron-core: silence the import-time notices there too.
quiet()

POLL_S = 0.2
"""How often :func:`wait` looks at the ranks."""

STOP_GRACE_S = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping the rest of a world."""

TIMEOUT_EXIT_CODE = 124
""":attr:`Outcome.code` of a world stopped at its timeout (as coreutils' ``timeout``)."""


def free_port() -> int:
    """A TCP port free on this host right now (for the world's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_envs(world: int, master_addr: str = "127.0.0.1",
              master_port: int = 0) -> list[DistEnv]:
    """The :class:`DistEnv` of ranks ``0..world-1`` (``master_port`` 0: a free port)."""
    port = master_port or free_port()
    return [DistEnv(rank=r, local_rank=r, world_size=world, master_addr=master_addr,
                    master_port=port, launcher="spawn") for r in range(world)]


def start(target: Callable[..., Any], envs: Sequence[DistEnv], *args: Any,
          name: str = "mptk-rank") -> list:
    """Start ``target(env, *args)`` for every env, each in a fresh spawned process named
    ``{name}{rank}``; ``target`` and ``args`` must be picklable."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    procs = [ctx.Process(target=target, name=f"{name}{env.rank}", args=(env, *args))
             for env in envs]
    for p in procs:
        p.start()
    return procs


@dataclass(frozen=True)
class Outcome:
    """How a world ended (:func:`wait`)."""

    codes: list[Optional[int]]
    """Exit codes in rank order (negative: killed by that signal)."""
    failed: Optional[int] = None
    """The rank whose failure ended the world, if one failed."""
    stopped: bool = False
    """Whether the ranks still running were stopped (failure or timeout)."""
    timed_out: bool = False

    @property
    def code(self) -> int:
        """One exit code for the world: the failed rank's, else the timeout's, else the
        largest clean one (e.g. 3 when the ranks stopped after a checkpoint)."""
        if self.failed is not None:
            return self.codes[self.failed] or 1
        if self.timed_out:
            return TIMEOUT_EXIT_CODE
        return max((c for c in self.codes if c is not None), default=0)


def wait(procs: list, timeout: Optional[float] = None,
         clean: Sequence[int] = (0,)) -> Outcome:
    """Wait for every rank. When one exits with a code not in ``clean``, or ``timeout``
    seconds have passed, stop the ones still running (they would hang in a collective)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(p.is_alive() for p in procs):
        failed = _first_failed(procs, clean)
        late = deadline is not None and time.monotonic() > deadline
        if failed is not None or late:
            stop(procs)
            return Outcome([p.exitcode for p in procs], failed, True, failed is None)
        time.sleep(POLL_S)
    return Outcome([p.exitcode for p in procs], _first_failed(procs, clean))


def _first_failed(procs: list, clean: Sequence[int]) -> Optional[int]:
    return next((r for r, p in enumerate(procs) if p.exitcode not in (None, *clean)), None)


def stop(procs: list, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL for ranks still alive after ``grace`` seconds (a rank that
    notes SIGTERM to save may be stuck in a collective with the failed peer)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=grace)
        if p.is_alive():
            p.kill()
            p.join(timeout=grace)


class RankError(RuntimeError):
    """A rank of :func:`run` failed, or the world ran past its timeout. ``str()`` is one
    line (which rank, how: the last line of its traceback); :meth:`details` adds every
    traceback the ranks left (``tracebacks``: rank -> text, the earliest written first)."""

    def __init__(self, outcome: Outcome, tracebacks: dict[int, str], missing: list[int],
                 timeout: Optional[float] = None):
        self.outcome, self.tracebacks, self.missing = outcome, tracebacks, missing
        self.timeout = timeout
        self.rank = next(iter(tracebacks), outcome.failed)
        super().__init__(self._headline())

    def _headline(self) -> str:
        codes = self.outcome.codes
        if self.outcome.timed_out:
            return f"timed out after {self.timeout:.0f} s (exit codes {codes})"
        if self.rank in self.tracebacks:
            return f"rank {self.rank}: {self.tracebacks[self.rank].strip().splitlines()[-1]}"
        if self.rank is not None:
            return f"rank {self.rank} exited with code {codes[self.rank]} (exit codes {codes})"
        return f"rank(s) {self.missing} returned no result (exit codes {codes})"

    def details(self) -> str:
        """The headline and each rank's traceback."""
        return "\n".join([str(self)] + [f"--- rank {r}\n{text}"
                                        for r, text in self.tracebacks.items()])


def run(fn: Callable[..., Any], world: int, *args: Any, timeout: Optional[float] = None,
        master_addr: str = "127.0.0.1", master_port: int = 0, tmp: Optional[Path] = None,
        stdout_to_stderr: bool = False, name: str = "mptk-rank") -> list:
    """``fn(env, *args)`` on ``world`` fresh spawned ranks; what each returns (picklable), in
    rank order. A failing rank stops the others and raises :class:`RankError`, as does the
    ``timeout`` (seconds for the whole world; ``None``: none). ``stdout_to_stderr`` sends
    the ranks' stdout to stderr (keeps the caller's stdout for its own output); ``tmp``: a
    folder for the result files (removed afterwards)."""
    out = Path(tempfile.mkdtemp(prefix="mptk-ranks-", dir=tmp))
    try:
        procs = start(_rank_main, rank_envs(world, master_addr, master_port), fn, args, out,
                      stdout_to_stderr, name=name)
        outcome = wait(procs, timeout)
        errs = sorted(out.glob("rank*.err"), key=lambda f: f.stat().st_mtime)
        tracebacks = {int(f.stem.removeprefix("rank")): f.read_text() for f in errs}
        missing = [r for r in range(world) if not (out / f"rank{r}.pkl").exists()]
        if outcome.failed is not None or outcome.timed_out or tracebacks or missing:
            raise RankError(outcome, tracebacks, missing, timeout)
        return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _rank_main(env: DistEnv, fn: Callable[..., Any], args: tuple, out: Path,
               stdout_to_stderr: bool) -> None:
    """A spawned rank of :func:`run`: the result, or the traceback, goes to a file; a
    finished rank ends through ``groups.finish`` (barrier, hard exit)."""
    if stdout_to_stderr:
        os.dup2(2, 1)
    from mptk.parallel import groups

    try:
        result = fn(env, *args)
        part = out / f"rank{env.rank}.part"
        part.write_bytes(pickle.dumps(result))
        part.rename(out / f"rank{env.rank}.pkl")
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        text = traceback.format_exc()
        (out / f"rank{env.rank}.err").write_text(text)
        sys.stderr.write(text)
        sys.stderr.flush()
        os._exit(1)
    groups.finish(0)
