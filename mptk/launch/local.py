"""Start N local workers when ``mptk-train`` runs bare (no torchrun, no srun)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time

from mptk.config.schema import RunConfig
from mptk.parallel.env import DistEnv
from mptk.exitcodes import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE
from mptk.log.noise import quiet

# A spawned worker imports this module first (it holds the process target), before the
# config's classes pull in megatron-core: silence its import-time notices there too.
quiet()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg: RunConfig, env: DistEnv) -> None:
    from mptk.train.loop import run

    run(cfg, env)


def spawn(cfg: RunConfig, nproc: int) -> int:
    """Run ``nproc`` workers; return 0, or the first failing worker's exit code."""
    port = cfg.launcher.master_port or free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, name=f"mptk-rank{r}", args=(cfg, DistEnv(
        rank=r, local_rank=r, world_size=nproc, master_addr=cfg.launcher.master_addr,
        master_port=port, launcher="spawn"))) for r in range(nproc)]
    for p in procs:
        p.start()
    forward_signals(procs)  # mptk #4: SIGTERM/SIGUSR1 reach the workers (they save, exit 3)
    return wait(procs)


CLEAN_EXITS = (0, REQUEUE_EXIT_CODE)
"""Worker exit codes that are not failures: done, or checkpointed after a stop signal."""


def forward_signals(procs: list) -> None:
    """Pass SIGTERM/SIGUSR1 sent to this launcher on to every live worker; a first Ctrl-C
    (SIGINT) goes on as SIGTERM (save, then stop), a second one kills the workers."""
    interrupts = []

    def forward(signum, frame):
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                _kill_now(procs)
            print("mptk: Ctrl-C: workers finish this step, save a checkpoint and stop "
                  "(Ctrl-C again to stop at once, without saving)", flush=True)
            signum = signal.SIGTERM
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)


def _kill_now(procs: list) -> None:
    """The second Ctrl-C: SIGKILL every worker, exit 130."""
    for p in procs:
        if p.is_alive():
            p.kill()
    print("mptk: stopped at once (second Ctrl-C); no checkpoint of this step", flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def wait(procs: list) -> int:
    """Wait for all; when one fails, stop the others (they would hang in a collective)."""
    while any(p.is_alive() for p in procs):
        failed = [p for p in procs if p.exitcode not in (None, *CLEAN_EXITS)]
        if failed:
            _stop(procs)
            print(f"mptk: worker {failed[0].name} exited with code {failed[0].exitcode}; "
                  f"stopped the others", flush=True)
            return failed[0].exitcode or 1
        time.sleep(0.2)
    codes = [p.exitcode for p in procs]
    return next((c for c in codes if c not in CLEAN_EXITS), max(codes))  # 3: stopped cleanly


def _stop(procs: list) -> None:
    """SIGTERM, then SIGKILL for workers still alive after 5 s (a worker that notes SIGTERM
    to save may be stuck in a collective with the failed peer)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
