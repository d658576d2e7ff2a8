"""Compose the Hydra tree and convert it, once, into typed :class:`RunConfig` objects.

Every failure (unknown key, wrong type, missing group option) becomes a :class:`ConfigError`
whose message is one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from mptk.config.schema import RunConfig
from mptk.config.store import register_schemas


class ConfigError(ValueError):
    """A bad configuration, explained on one line: the field, what is wrong, the fix."""

    def __init__(self, message: str) -> None:
        lines = (line.strip() for line in str(message).splitlines())
        super().__init__("; ".join(line for line in lines if line).replace(".; ", "; "))


def conf_dir() -> Path:
    """The Hydra tree: ``$MPTK_CONF_DIR``, else the one shipped inside the package (a wheel
    installs the repository's ``conf/`` as ``mptk/conf``), else ``conf/`` of a source checkout."""
    env = os.environ.get("MPTK_CONF_DIR")
    package = Path(__file__).resolve().parents[1]
    shipped = package / "conf"
    folder = Path(env) if env else shipped if shipped.is_dir() else package.parent / "conf"
    if not (folder / "config.yaml").is_file():
        raise ConfigError(
            f"conf dir {folder} has no config.yaml; set MPTK_CONF_DIR to the folder of the Hydra tree"
        )
    return folder.resolve()


# --------------------------------------------------------------------------- conversion


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Convert a composed config to typed objects, or raise a one-line :class:`ConfigError`."""
    try:
        _check_known_keys(cfg, "")
        run = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(explain(exc)) from exc
    if not isinstance(run, RunConfig):
        raise ConfigError(
            f"config: composed a {type(run).__name__}, not a RunConfig; "
            "put base_config first in the primary config's defaults"
        )
    return run


def _check_known_keys(node: DictConfig, path: str) -> None:
    """Refuse keys a structured node's dataclass has no field for (``+model.typo=1``)."""
    known = _field_names(OmegaConf.get_type(node))
    for key in node.keys():
        name = f"{path}{key!s}"
        if known is not None and key not in known:
            raise ConfigError(_unknown_key(name, node, str(key)))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and _is_plain(child):
            _check_known_keys(child, f"{name}.")


def _is_plain(node: DictConfig) -> bool:
    """A node whose keys can be listed without resolving anything."""
    return not (node._is_missing() or node._is_none() or node._is_interpolation())


def _field_names(kind: Any) -> list[str] | None:
    """Field names of a dataclass type, or None for plain dicts."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return [f.name for f in dataclasses.fields(kind)]
    return None


def _unknown_key(full_key: str, node: Any, key: str) -> str:
    """The one-line explanation of an unknown key under ``node``."""
    kind = OmegaConf.get_type(node) if node is not None else None
    known = _field_names(kind)
    if known is None:
        return f"{full_key}: no such key; add it with +{full_key}=<value> or fix the spelling"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"{full_key}: unknown key for {getattr(kind, '__name__', kind)}; known keys: {', '.join(known)} "
        f"({hint}drop the override or fix the spelling)"
    )


# --------------------------------------------------------------------------- explanations


def explain(exc: BaseException) -> str:
    """One line naming the field and the fix for an OmegaConf/Hydra/dataclass error."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, OmegaConfBaseException):
        return _explain_omegaconf(exc)
    if isinstance(exc, MissingConfigException):
        return _explain_missing_option(exc)
    if isinstance(exc, OverrideParseException):
        return f"override {exc.override!r}: {_first_line(exc.message)}; write it as key=value"
    cause = exc.__cause__
    if isinstance(exc, HydraException) and isinstance(cause, OmegaConfBaseException):
        return _explain_omegaconf(cause)
    return str(exc).strip() or type(exc).__name__


def _explain_omegaconf(exc: OmegaConfBaseException) -> str:
    key = exc.full_key or "config"
    what = _first_line(exc.msg or str(exc))
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key(key, exc.parent_node, str(exc.key))
    if isinstance(exc, MissingMandatoryValue):
        return f"{key}: missing value; set it, e.g. {key}=<value>"
    if isinstance(exc, InterpolationResolutionError):
        return f"{key}: {what}; fix the ${{...}} interpolation"
    if isinstance(exc, ValidationError) and "expected one of" in what:
        return f"{key}: {what}; pick one of those"
    if isinstance(exc, ValidationError):
        return f"{key}: {what}; give a value of type {_field_type(exc)}"
    return f"{key}: {what}"


def _field_type(exc: OmegaConfBaseException) -> str:
    """The declared type of the field an error is about, as written in the schema."""
    kind = exc.object_type
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        for f in dataclasses.fields(kind):
            if f.name == exc.key:
                return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return "the schema's type"


def _explain_missing_option(exc: MissingConfigException) -> str:
    missing = exc.missing_cfg_file or "config"
    group, _, option = missing.rpartition("/")
    options = [o for o in exc.options or [] if not o.startswith("base_")]
    if not group:
        return f"config {missing!r}: not found in the Hydra tree; {_first_line(str(exc))}"
    return (
        f"{group}={option}: no such option in group {group}; available: {', '.join(options) or 'none'} "
        f"(fix the spelling or add conf/{group}/{option}.yaml)"
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


# --------------------------------------------------------------------------- composition


def compose_cfg(
    overrides: list[str], config_name: str = "config", return_hydra_config: bool = False
) -> DictConfig:
    """Compose the Hydra tree with ``overrides`` into a DictConfig (errors as ConfigError)."""
    register_schemas()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_explain_composition(exc, overrides)) from exc
    finally:
        restore_gh_from_backup(backup)


def _explain_composition(exc: BaseException, overrides: list[str]) -> str:
    """Like :func:`explain`, with a fix for ``+group=option`` on a group already chosen."""
    text = _first_line(str(exc))
    if text.startswith("Multiple values for "):
        group = text.removeprefix("Multiple values for ").split(".")[0]
        plus = [o for o in overrides if o.startswith(f"+{group}=")]
        fix = f"use {plus[0][1:]}" if plus else f"use {group}=<option>"
        return f"{group}: already chosen in the defaults list; {fix} (no '+')"
    return explain(exc)


def compose(overrides: list[str], config_name: str = "config") -> RunConfig:
    """Compose the Hydra tree with ``overrides`` and convert it to a :class:`RunConfig`."""
    return to_run_config(compose_cfg(overrides, config_name))
