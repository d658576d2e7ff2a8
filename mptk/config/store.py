"""Store the typed schemas in Hydra's ConfigStore so YAML options can extend them."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from mptk.config import registry, schema

GROUPS: dict[str, type] = {
    "parallel": schema.ParallelConfig,
    "zero": schema.ZeroConfig,
    "optim": schema.OptimConfig,
    "data": schema.DataConfig,
    "train": schema.TrainConfig,
    "log": schema.LogConfig,
    "launcher": schema.LauncherConfig,
    "cluster": schema.ClusterConfig,
}
"""Config group -> schema; each is stored as ``<group>/base_<group>``."""


def register_schemas() -> None:
    """Store ``base_config`` and every ``base_<group>`` (recipes add ``model/base_<recipe>``).

    Idempotent: storing the same name again replaces the entry with an identical one.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema.RunConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
    for name in registry.names():  # discovers recipes; re-stores their schemas too
        cs.store(group="model", name=f"base_{name}", node=registry.get(name).config)
