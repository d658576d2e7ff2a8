"""The Hydra tree under conf/: every option composes into typed objects; mistakes are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import open_dict

from mptk.config import registry, schema
from mptk.config.load import ConfigError, compose, compose_cfg, conf_dir, to_run_config
from mptk.config.store import GROUPS, register_schemas
from mptk.train.preflight import Layout, preflight

CONF = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUP_OPTIONS = [(g, o) for g in [*GROUPS, "model"] for o in options(g)]


def test_conf_dir_is_the_repo_tree():
    assert conf_dir() == CONF


def test_every_group_has_options():
    for group in [*GROUPS, "model", "experiment"]:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_to_its_schema(group, option):
    run = compose([f"{group}={option}"])
    assert isinstance(run, schema.RunConfig)
    node = getattr(run, group)
    expected = registry.get(run.model.recipe).config if group == "model" else GROUPS[group]
    assert type(node) is expected


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_passes_preflight(name):
    run = compose([f"experiment={name}"])
    layout = preflight(run, world_size=run.launcher.nproc_per_node, cuda_available=False)
    assert layout.world == run.launcher.nproc_per_node


@pytest.mark.parametrize("model", options("model"))
def test_every_model_passes_preflight_with_the_default_layout(model):
    data = ["data.source=digits"] if model.startswith("vit") else []  # image recipes need images
    run = compose([f"model={model}", *data])
    preflight(run, world_size=4, cuda_available=False)


def test_defaults_are_the_quick_start():
    run = compose([])
    assert run == compose(["experiment=quickstart"])
    assert (run.parallel.tp, run.parallel.pp, run.zero.stage) == (2, 1, 1)
    assert run.launcher.nproc_per_node == 4
    assert (run.model.recipe, run.model.num_layers, run.model.hidden_size) == ("gpt", 4, 128)
    assert run.data.source is schema.DataSource.stdlib
    assert run.log.wandb.mode is schema.WandbMode.offline
    layout = preflight(run, world_size=4, cuda_available=False)
    assert layout == Layout(tp=2, pp=1, dp=2, grad_acc=1, world=4)


def test_values_are_typed():
    run = compose(["train.dtype=bf16", "model.position_embedding=rope", "optim=sgd"])
    assert run.train.dtype is schema.DType.bf16
    assert run.model.position_embedding is schema.PositionEmbedding.rope
    assert run.optim.name is schema.OptimizerName.sgd


def test_command_line_beats_experiment():
    run = compose(["experiment=tp2_dp2_zero2", "zero=zero3", "train.steps=7"])
    assert (run.zero.stage, run.train.steps) == (3, 7)


def test_zero_extra_accepts_free_form_keys():
    run = compose(["+zero.extra.bf16.enabled=true"])
    assert run.zero.extra == {"bf16": {"enabled": True}}


def test_hydra_dirs_and_chdir():
    hydra = compose_cfg([], return_hydra_config=True).hydra
    assert hydra.run.dir.startswith("outputs/")
    assert hydra.sweep.dir.startswith("multirun/")
    assert hydra.job.chdir is False


def test_register_schemas_is_idempotent():
    register_schemas()
    register_schemas()
    repo = ConfigStore.instance().repo
    assert "base_config.yaml" in repo
    for group in [*GROUPS, "model"]:
        assert f"base_{group if group != 'model' else 'gpt'}.yaml" in repo[group]


BAD_OVERRIDES = [
    (["model.hiden_size=3"], ["model.hiden_size: unknown key for GPTConfig", "did you mean hidden_size"]),
    (["+model.typo=1"], ["model.typo: unknown key for GPTConfig", "known keys:", "hidden_size"]),
    (["+train.typo=1"], ["train.typo: unknown key for TrainConfig"]),
    (["log.wandb.projct=x"], ["log.wandb.projct: unknown key for WandbConfig", "did you mean project"]),
    (["train.steps=abc"], ["train.steps:", "'abc'", "type int"]),
    (["parallel.tp=1.5"], ["parallel.tp:", "type int"]),
    (["train.dtype=fp64"], ["train.dtype:", "fp32, bf16, fp16"]),
    (["zero=zero9"], ["zero=zero9: no such option in group zero", "zero3_offload"]),
    (["model=gpt_huge"], ["model=gpt_huge: no such option in group model", "gpt_tiny"]),
    (["experiment=nope"], ["experiment=nope", "quickstart"]),
    (["+experiment=quickstart"], ["experiment: already chosen", "use experiment=quickstart"]),
    (["nogroup=x"], ["nogroup: unknown key for RunConfig"]),
    (["model.recipe=???"], ["model.recipe: missing value"]),
    (["train.steps=${nope}"], ["train.steps:", "nope"]),
    (["train steps"], ["override 'train steps'"]),
]


@pytest.mark.parametrize("overrides,parts", BAD_OVERRIDES, ids=[o[0] for o, _ in BAD_OVERRIDES])
def test_bad_override_is_a_one_line_config_error(overrides, parts):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_to_run_config_refuses_an_unknown_key():
    cfg = compose_cfg([])
    with open_dict(cfg.optim):
        cfg.optim.lrr = 0.1
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key for OptimConfig.*did you mean lr"):
        to_run_config(cfg)


def test_conf_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MPTK_CONF_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MPTK_CONF_DIR"):
        conf_dir()
    monkeypatch.setenv("MPTK_CONF_DIR", str(CONF))
    assert compose(["train=smoke"]).train.steps == 10


def test_config_error_is_one_line():
    assert str(ConfigError("a.\n  b\n\nc")) == "a; b; c"
