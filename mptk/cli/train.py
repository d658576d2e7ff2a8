"""``mptk-train``: compose the config, check it, then train under torchrun/srun or spawn
``launcher.nproc_per_node`` local workers. Thin: parse, call, exit code."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mptk.checkpoint.hf import fill_model, fill_tokenizer, hf_dir
from mptk.config.checks import clamp_warmup, submitit_job
from mptk.config.load import ConfigError, compose, compose_cfg, conf_dir, to_run_config
from mptk.config.schema import RunConfig
from mptk.config.store import register_schemas
from mptk.launch.sweep_job import apply_cluster_env
from mptk.log.noise import quiet
from mptk.parallel.env import detect, ensure_gloo_ifname
from mptk.train.preflight import PreflightError, startup


def checked(dcfg: DictConfig) -> tuple[RunConfig, int]:
    """Typed config with the run dir filled in, and the world size; raises on bad input."""
    hydra_cfg = HydraConfig.get()
    cfg = to_run_config(dcfg)
    apply_cluster_env(cfg.cluster)  # a submitit sweep job: what an sbatch script exports
    return check_all(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))


_WARNED: set[str] = set()


def fill_from_hf(cfg: RunConfig, overrides: list[str], speak: bool) -> None:
    """``train.init_from=hf:DIR``: the ``model.*`` fields not set by ``overrides`` come from
    DIR/config.json, and the tokenizer from DIR; the launcher (or rank 0) says which, once."""
    filled = fill_model(cfg, overrides) + fill_tokenizer(cfg, overrides)
    line = f"from {hf_dir(cfg.train.init_from)}: {' '.join(filled)}"
    if filled and speak and line not in _WARNED:
        _WARNED.add(line)
        print(f"mptk: {line}", file=sys.stderr, flush=True)


def check_all(cfg: RunConfig, run_dir: str, overrides: list[str]) -> tuple[RunConfig, int]:
    """Layout, memory and checkpoint checks of ``cfg`` run in ``run_dir``, after the
    adjustments that only warn (each warning printed once, by the launcher or rank 0) and the
    ``model.*`` fields ``train.init_from=hf:DIR`` fills from config.json."""
    cfg.run_dir = run_dir
    env = detect()
    fill_from_hf(cfg, overrides, env is None or env.rank == 0)
    world = env.world_size if env else cfg.launcher.nproc_per_node
    note = clamp_warmup(cfg)
    if note and note not in _WARNED and (env is None or env.rank == 0):
        _WARNED.add(note)
        print(f"mptk: warning: {note}", file=sys.stderr, flush=True)
    startup(cfg, world, torch.cuda.is_available())
    return cfg, world


class SweepJobError(RuntimeError):
    """A submitit sweep job's failure, raised so that submitit hands it to the sweep."""


def _fail(code: int, line: str = "") -> NoReturn:
    """Exit with ``code``; in a submitit sweep job raise instead: submitit records an exception
    as the job's result (the sweep stops with it), an exit leaves no result to wait for."""
    if submitit_job(os.environ):
        raise SweepJobError(line or f"mptk: the run's ranks exited with code {code}")
    if line:
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def train(dcfg: DictConfig) -> None:
    try:
        cfg, world = checked(dcfg)
    except (ConfigError, PreflightError) as err:
        _fail(2, f"mptk: error: {err}")
    env = detect()
    if env is not None:
        from mptk.train.loop import run

        ensure_gloo_ifname(env)  # before the rendezvous: across nodes gloo must not bind to lo
        run(cfg, env)
    from mptk.launch.local import spawn

    code = spawn(cfg, world)
    if code:
        _fail(code)


def planned_run_dir(argv: list[str]) -> str:
    """The run dir Hydra will use (``hydra.run.dir``, resolved now)."""
    return str(compose_cfg(argv, return_hydra_config=True).hydra.run.dir)


def precheck(argv: list[str]) -> None:
    """Compose and check plain override lists up front, before Hydra creates or writes into
    the run dir: a typo, a wrong type or a refused layout/checkpoint setting is one clear line
    and nothing on disk changes (Hydra's own handling covers ``-m``, ``--cfg``, ``--help``)."""
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        check_all(compose(argv), planned_run_dir(argv), argv)
    except (ConfigError, PreflightError) as err:
        print(f"mptk: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    quiet()
    register_schemas()
    precheck(sys.argv[1:])
    hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")(train)()


if __name__ == "__main__":
    main()
