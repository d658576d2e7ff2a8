"""Recipe registry: a recipe is a config schema, a model builder and a batch/loss function.

Recipes live outside the library (``recipes/`` in this repo, shipped as ``mptk.recipes``, or any
folder named in the ``MPTK_RECIPE_PATH`` environment variable). :func:`discover` imports them; each calls
:func:`register` at import time, which also stores its schema as ``base_<name>`` in Hydra's
ConfigStore under the ``model`` group, so a YAML option can extend it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from mptk.config.schema import ModelConfig, Recompute, RecomputeMethod
from mptk.config.shape import Shape, transformer


@dataclass(frozen=True, slots=True)
class Recipe:
    """What mptk needs to train one kind of model."""

    name: str
    """Registry key; ``model.recipe`` in the config."""
    config: type[ModelConfig]
    """Schema of the model group (a ModelConfig subclass)."""
    build: Callable[..., Any]
    """``build(model_cfg, ctx) -> torch.nn.Module`` for this rank's stage."""
    loss: Callable[..., Any]
    """``loss(model, batch) -> (scalar loss, metrics dict)``."""
    data: Callable[..., Any]
    """``data(run_cfg, ctx) -> DataSource`` with ``train_batches`` and ``eval_batches``."""
    forward: Optional[Callable[..., Any]] = None
    """Pipeline form of ``loss`` (needed for pp>1): ``forward(stage_model, batch) ->
    (output, reduce)`` where ``reduce(output) -> (loss, metrics)`` runs on the last stage."""
    checks: Callable[..., list[str]] = lambda run_cfg: []
    """Extra preflight checks: ``checks(run_cfg) -> list of error lines``."""
    units: str = "tokens"
    """What throughput counts (``tokens`` -> ``tokens_per_s``, ``images`` -> ``images_per_s``)."""
    units_per_sample: Callable[..., int] = lambda model_cfg: model_cfg.seq_length
    """Throughput units in one sample (tokens: seq_length; images: 1)."""
    eval_summary: Callable[[dict[str, Any]], dict[str, Any]] = lambda sums: {}
    """Extra eval metrics from the dp-summed ``loss`` metrics, e.g. ``{"eval_top1": c / n}``."""
    shape: Callable[[ModelConfig], Shape] = transformer
    """``shape(model_cfg) -> Shape``: dimensions and ends (embedding, head) for the cost model
    (:mod:`mptk.plan.cost`: planner, pipeline stage balance, FLOP/s). The default counts the
    transformer layers of the model config alone, with no embedding or head."""
    example_batch: Optional[Callable[..., dict[str, Any]]] = None
    """``example_batch(model_cfg, micro_batch_size, generator) -> batch``: a random micro-batch
    of the recipe's inputs for calibration runs without data files (``mptk-plan --measure``)."""


_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe and store its schema as ``model/base_<name>`` in the ConfigStore."""
    _RECIPES[recipe.name] = recipe
    ConfigStore.instance().store(group="model", name=f"base_{recipe.name}", node=recipe.config)
    return recipe


def get(name: str) -> Recipe:
    """The recipe called ``name``, or a one-line error listing the known ones."""
    discover()
    if name not in _RECIPES:
        known = ", ".join(sorted(_RECIPES)) or "none"
        raise KeyError(f"model.recipe={name!r} is not a registered recipe (known: {known})")
    return _RECIPES[name]


def names() -> list[str]:
    discover()
    return sorted(_RECIPES)


def _import_tree(folder: Path) -> None:
    """Import every package directly under ``folder`` (each is one recipe)."""
    if str(folder) not in sys.path:  # spawned workers unpickle the recipe's config by name
        sys.path.append(str(folder))
    for info in pkgutil.iter_modules([str(folder)]):
        if info.name in sys.modules:
            continue
        where = folder / info.name
        spec = (importlib.util.spec_from_file_location(info.name, where / "__init__.py",
                                                       submodule_search_locations=[str(where)])
                if info.ispkg else importlib.util.spec_from_file_location(info.name, f"{where}.py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"MPTK_RECIPE_PATH: cannot import {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[info.name] = module
        spec.loader.exec_module(module)


def discover() -> None:
    """Import the bundled recipes and those on ``MPTK_RECIPE_PATH`` (idempotent)."""
    # By name, as a plugin: the bundled recipes (the repository's recipes/ folder, shipped
    # inside the package) sit above config in the layers.
    bundled = importlib.import_module("mptk.recipes")
    for info in pkgutil.iter_modules(bundled.__path__):
        importlib.import_module(f"mptk.recipes.{info.name}")
    for folder in filter(None, os.environ.get("MPTK_RECIPE_PATH", "").split(os.pathsep)):
        _import_tree(Path(folder))


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What a recipe's ``build`` needs to know about this rank besides its model config."""

    tp: int
    pp: int
    dtype: Any
    """mptk ``DType``."""
    pre_process: bool
    """This pipeline stage holds the input embedding."""
    post_process: bool
    """This pipeline stage holds the output layer and loss."""
    vp_stage: Optional[int] = None
    """Model chunk index on this rank with the interleaved schedule (``None`` without)."""
    stage_layers: Optional[list[int]] = None
    """Layers per virtual stage (pp>1), see :mod:`mptk.plan.partition`."""
    batch_p2p: bool = True
    """Batched pipeline p2p (off on gloo)."""
    sp: bool = False
    """Sequence parallelism inside the tensor-parallel group (``parallel.sp``)."""
    recompute: Recompute = Recompute.none
    """Activation recomputation (``train.recompute``)."""
    recompute_method: RecomputeMethod = RecomputeMethod.uniform
    """``train.recompute_method``."""
    recompute_layers: int = 1
    """``train.recompute_layers``."""
