"""Start N local workers when ``mptk-train`` runs bare (no torchrun, no srun)."""

from __future__ import annotations

import os
import signal

from mptk.config.schema import RunConfig
from mptk.exitcodes import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE
from mptk.launch import runner, sweep_job
from mptk.log.noise import quiet

# A spawned worker imports this module first (it holds the process target), before the
# config's classes pull in megatron-core: silence its import-time notices there too.
quiet()


def _worker(env, cfg: RunConfig) -> None:
    from mptk.train.loop import run

    sweep_job.ignore_in_rank()
    flight_recorder(cfg.run_dir)
    run(cfg, env)


def flight_recorder(run_dir: str) -> None:
    """torch's flight recorder variables into this worker's environment (before its process
    group exists; values the user set win). On GPUs its dump folder is made now: NCCL's own
    dump on a collective timeout does not make it (mptk's hang dump does)."""
    import torch

    from mptk.log.watchdog import flight_recorder_env, flight_recorder_prefix

    for name, value in flight_recorder_env(run_dir).items():
        os.environ.setdefault(name, value)
    if torch.cuda.is_available():
        flight_recorder_prefix(run_dir).parent.mkdir(parents=True, exist_ok=True)


def spawn(cfg: RunConfig, nproc: int) -> int:
    """Run ``nproc`` workers; return 0, or the first failing worker's exit code. In a submitit
    sweep job submitit's signal is a save-and-requeue (:mod:`mptk.launch.sweep_job`)."""
    envs = runner.rank_envs(nproc, cfg.launcher.master_addr, cfg.launcher.master_port)
    handoff = sweep_job.handoff()
    with sweep_job.held_for_new_ranks(handoff):
        procs = runner.start(_worker, envs, cfg)
    forward_signals(procs)  # SIGTERM/SIGUSR1 reach the workers (they save, exit 3)
    if handoff is None:
        return wait(procs)
    handoff.started(procs)
    code = wait(procs)
    handoff.finish(code)  # saved for submitit's signal: submitit requeues the job from here
    return code


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
    end = runner.wait(procs, clean=CLEAN_EXITS)
    if end.stopped and end.failed is not None:
        print(f"mptk: worker {procs[end.failed].name} exited with code "
              f"{end.codes[end.failed]}; stopped the others", flush=True)
    return end.code  # 3: every worker stopped cleanly after a checkpoint
