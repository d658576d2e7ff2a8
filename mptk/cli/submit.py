"""``mptk-submit``: render an sbatch script for one run from the typed config, check it, submit it.

    mptk-submit [--dry-run] [--python PATH] [hydra overrides...]

Composes the config (``cluster=<profile>`` picks the allocation and fabric), runs preflight
for a world of ``cluster.nodes * cluster.tasks_per_node``, writes ``<run dir>/job.sbatch``
(run dir as Hydra makes it: ``outputs/<date>/<time>`` or ``hydra.run.dir=``), prints its path
and the sbatch line, then submits it unless ``--dry-run``.

``--job-env`` is used inside the checked-in ``slurm/*.sbatch`` examples: it composes the
overrides, runs preflight for the allocation Slurm gave (``$SLURM_NTASKS``) and prints the
fabric variables as ``export`` lines for the batch script to ``eval``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mptk.config.load import ConfigError, compose, compose_cfg
from mptk.config.schema import RunConfig
from mptk.exitcodes import CONFIG_ERROR
from mptk.launch import slurm
from mptk.log.noise import quiet
from mptk.train.preflight import PreflightError, preflight, slurm_world

SCRIPT_NAME = "job.sbatch"


class SubmitError(RuntimeError):
    """A one-line reason the job was not submitted."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mptk-submit", description="Render, check and sbatch one mptk run.",
        epilog="example: mptk-submit cluster=infiniband cluster.nodes=4 model=gpt_small parallel.tp=8")
    parser.add_argument("--dry-run", action="store_true", help="render and check only; do not sbatch")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter the tasks run (default: this one; $MPTK_PYTHON overrides in the job)")
    parser.add_argument("--job-env", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mptk-train")
    return parser.parse_args(argv)


def user_overrides(overrides: list[str]) -> list[str]:
    """The overrides baked into the script: all but ``hydra.run.dir`` (the script sets it)."""
    return [o for o in overrides if not o.startswith("hydra.run.dir=")]


def run_dir_of(overrides: list[str]) -> Path:
    """The run dir Hydra would make for these overrides, absolute."""
    hydra_cfg = compose_cfg(overrides, return_hydra_config=True).hydra
    return Path(str(hydra_cfg.run.dir)).expanduser().resolve()


def check(cfg: RunConfig, world: int) -> None:
    """Cluster problems and preflight, for ``world`` tasks; raises :class:`PreflightError`."""
    problems = slurm.problems(cfg.cluster)
    try:
        layout = preflight(cfg, world, cuda_available=cfg.cluster.gpus_per_node > 0)
        problems += memory_problems(cfg, layout)
    except PreflightError as err:
        problems += err.problems
    problems += slurm_world(cfg.cluster, world, under_slurm=True)
    if problems:
        raise PreflightError(list(dict.fromkeys(problems)))


def memory_problems(cfg: RunConfig, layout) -> list[str]:
    """mptk-plan's verdict for the allocation (needs ``cluster.gpu``; skipped without it)."""
    from mptk.plan import predict_fits

    fits, reason = predict_fits(cfg, layout, cfg.cluster)
    return [] if fits else [f"memory: {reason}"]


def render_job(cfg: RunConfig, overrides: list[str], run_dir: Path, python: str) -> Path:
    """Write ``<run_dir>/job.sbatch``; returns its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT_NAME
    spec = slurm.job_spec(cfg.cluster, user_overrides(overrides), str(run_dir), python)
    script.write_text(slurm.render(spec))
    script.chmod(0o755)
    return script


def sbatch(script: Path) -> str:
    """Submit; returns the job id (``sbatch --parsable`` prints ``id[;cluster]``)."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    except FileNotFoundError as err:
        raise SubmitError("sbatch not found: run on a Slurm login node, or use --dry-run") from err
    if done.returncode:
        raise SubmitError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def submit(args: argparse.Namespace) -> None:
    cfg = compose(args.overrides)
    world = cfg.cluster.nodes * cfg.cluster.tasks_per_node
    check(cfg, world)
    run_dir = run_dir_of(args.overrides)
    if any(ch.isspace() for ch in str(run_dir)):
        raise SubmitError(f"run dir {str(run_dir)!r} has whitespace, which #SBATCH --output cannot "
                          "hold; choose another hydra.run.dir")
    script = render_job(cfg, args.overrides, run_dir, args.python)
    print(f"mptk: script {script}")
    print(f"mptk: {cfg.cluster.nodes} node(s) x {cfg.cluster.tasks_per_node} task(s) = world {world}; "
          f"fabric {cfg.cluster.fabric.value}; run dir {run_dir}")
    print(f"sbatch {shlex.quote(str(script))}")
    if args.dry_run:
        return
    job = sbatch(script)
    print(f"mptk: submitted job {job}; output {run_dir}/slurm-{job}.out", flush=True)


def job_env(args: argparse.Namespace) -> None:
    """Inside a batch script: check the config against the allocation, print its exports."""
    cfg = compose(args.overrides)
    world = int(os.environ.get("SLURM_NTASKS") or cfg.cluster.nodes * cfg.cluster.tasks_per_node)
    check(cfg, world)
    print(slurm.exports(slurm.fabric_env(cfg.cluster)))


def main(argv: list[str] | None = None) -> None:
    quiet()
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        job_env(args) if args.job_env else submit(args)
    except (ConfigError, PreflightError, SubmitError) as err:
        for line in str(err).splitlines():
            print(f"mptk: error: {line}", file=sys.stderr, flush=True)
        sys.exit(CONFIG_ERROR if not isinstance(err, SubmitError) else 1)


if __name__ == "__main__":
    main()
