"""A model added without touching mptk: a recipe package and its YAML in a folder of their own,
found through ``MPTK_RECIPE_PATH`` (the code) and ``hydra.searchpath`` (the config)."""

import textwrap

import pytest
from e2e_util import metrics, mptk

pytestmark = pytest.mark.e2e

RECIPE = '''
"""A two-layer MLP on flattened images: a recipe that lives outside mptk."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mptk.config.schema import ModelConfig
from mptk.config import registry


@dataclass(kw_only=True, slots=True)
class MLPConfig(ModelConfig):
    """An MLP classifier."""

    recipe: str = "mlp_digits"
    image_size: int = 8
    """Input height and width."""
    num_classes: int = 10
    """Output classes."""


def build(cfg, ctx):
    pixels = cfg.image_size * cfg.image_size
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(pixels, cfg.hidden_size),
                               torch.nn.GELU(), torch.nn.Linear(cfg.hidden_size, cfg.num_classes))


def loss(model, batch):
    logits = model(batch["images"]).float()
    correct = (logits.argmax(-1) == batch["labels"]).sum().detach()
    return F.cross_entropy(logits, batch["labels"]), {"correct": correct,
                                                       "samples": batch["labels"].numel()}


def data(cfg, layout, log=print):
    from mptk.data.images import ImageData

    m = cfg.model
    return ImageData.prepare(cfg, layout, m.image_size, 1, m.num_classes, log=log)


RECIPE = registry.register(registry.Recipe(
    name="mlp_digits", config=MLPConfig, build=build, loss=loss, data=data, units="images",
    units_per_sample=lambda m: 1,
    eval_summary=lambda sums: {"eval_top1": sums["correct"] / sums["samples"]}))
'''

MODEL_YAML = """
# An MLP on digits (a recipe from MPTK_RECIPE_PATH).
defaults:
  - base_mlp_digits
  - _self_

recipe: mlp_digits
hidden_size: 64
"""


def write_recipe(root):
    """``root/recipes/mlp_digits/__init__.py`` and ``root/conf/model/mlp_digits.yaml``."""
    package = root / "recipes" / "mlp_digits"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(RECIPE).lstrip())
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "mlp_digits.yaml").write_text(textwrap.dedent(MODEL_YAML).lstrip())
    return root / "recipes", root / "conf"


def test_recipe_from_recipe_path_trains(tmp_path):
    recipes, conf = write_recipe(tmp_path / "mine")
    run_dir = tmp_path / "run"
    out = mptk("model=mlp_digits", "data.source=digits", "data.heldout_fraction=0.2",
               "parallel=single", "zero=zero2", "launcher.nproc_per_node=2", "train=smoke",
               "train.micro_batch_size=8", "train.global_batch_size=16", "log=disabled",
               f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={run_dir}",
               env={"MPTK_RECIPE_PATH": str(recipes)}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "model mlp_digits" in out.stdout and "dp=2" in out.stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert "images_per_s" in rows[0] and 0.0 <= rows[-1]["eval_top1"] <= 1.0


def test_unknown_model_option_without_searchpath(tmp_path):
    recipes, _ = write_recipe(tmp_path / "mine")
    out = mptk("model=mlp_digits", f"hydra.run.dir={tmp_path / 'run'}",
               env={"MPTK_RECIPE_PATH": str(recipes)}, timeout=300)
    assert out.returncode == 2
    assert "model=mlp_digits: no such option" in out.stderr
