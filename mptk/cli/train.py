"""``mptk-train``: compose the config, check it, then train under torchrun/srun or spawn
``launcher.nproc_per_node`` local workers. Thin: parse, call, exit code."""

from __future__ import annotations

import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mptk.config.checks import clamp_warmup
from mptk.config.load import ConfigError, compose, compose_cfg, conf_dir, to_run_config
from mptk.config.schema import RunConfig
from mptk.config.store import register_schemas
from mptk.log.noise import quiet
from mptk.parallel.env import detect
from mptk.train.preflight import PreflightError, startup


def checked(dcfg: DictConfig) -> tuple[RunConfig, int]:
    """Typed config with the run dir filled in, and the world size; raises on bad input."""
    return check_all(to_run_config(dcfg), HydraConfig.get().runtime.output_dir)


_WARNED: set[str] = set()


def check_all(cfg: RunConfig, run_dir: str) -> tuple[RunConfig, int]:
    """Layout, memory and checkpoint checks of ``cfg`` run in ``run_dir``, after the
    adjustments that only warn (each warning printed once, by the launcher or rank 0)."""
    cfg.run_dir = run_dir
    env = detect()
    world = env.world_size if env else cfg.launcher.nproc_per_node
    note = clamp_warmup(cfg)
    if note and note not in _WARNED and (env is None or env.rank == 0):
        _WARNED.add(note)
        print(f"mptk: warning: {note}", file=sys.stderr, flush=True)
    startup(cfg, world, torch.cuda.is_available())
    return cfg, world


def train(dcfg: DictConfig) -> None:
    try:
        cfg, world = checked(dcfg)
    except (ConfigError, PreflightError) as err:
        print(f"mptk: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    env = detect()
    if env is not None:
        from mptk.train.loop import run

        run(cfg, env)
    from mptk.launch.local import spawn

    code = spawn(cfg, world)
    if code:
        sys.exit(code)


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
        check_all(compose(argv), planned_run_dir(argv))
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
