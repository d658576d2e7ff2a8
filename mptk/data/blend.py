"""Blends of indexed datasets -> megatron-core ``GPTDataset`` / ``BlendedDataset`` splits.

``data.blend`` takes any of these forms (a prefix is the path without ``.bin``/``.idx``)::

    [0.3, /data/web, 0.7, /data/code]     # weight, prefix, weight, prefix ... (megatron's form)
    [{path: /data/web, weight: 0.3}, {path: /data/code, weight: 0.7}]
    [/data/web, /data/code]               # no weights: in proportion to their sizes
    [/data/web]                           # one dataset

``data.split`` ([98, 2, 0]; [969, 30, 1] adds a test split) cuts every prefix's documents
into train / valid / test document ranges, as megatron does.

Index caches (document, sample, shuffle and blending indices) go under
``<data.cache_dir>/megatron-indices``. They are built by :func:`build` under a file lock in
that folder, with megatron's builder run as if this process were alone: the first process
on a filesystem to take the lock builds, every other one then finds the cache and only
loads it. Under the training loop (``rank_zero_first``) the builder is global rank 0; on
multi-node jobs whose cache_dir is node-local, it is one rank per node (whichever comes
first; the indices are identical everywhere, as they depend only on data, seed and sizes).
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.distributed as dist

from mptk.data import preprocess

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True, slots=True)
class Blend:
    """Dataset prefixes (absolute) and their weights (None: in proportion to size)."""

    prefixes: tuple[str, ...]
    weights: Optional[tuple[float, ...]] = None

    def megatron(self) -> tuple[list[str], Optional[list[float]]]:
        """megatron's ``(prefixes, weights)`` form."""
        return list(self.prefixes), None if self.weights is None else list(self.weights)


# ---------------------------------------------------------------------------------------
# Parsing and checking
# ---------------------------------------------------------------------------------------


def _prefix(value: Any) -> str:
    """An absolute prefix; a trailing ``.bin`` / ``.idx`` is dropped."""
    text = os.path.expanduser(str(value))
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return str(Path(text).resolve())


def _is_number(value: Any) -> bool:
    """A weight: a number, or a string that reads as one."""
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _from_dicts(items: list) -> Blend:
    """``[{path:, weight:}, ...]`` (weight defaults to 1)."""
    for item in items:
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight"}:
            raise ValueError(f"data.blend entry {item!r} must be {{path: PREFIX, weight: W}}")
    return Blend(tuple(_prefix(i["path"]) for i in items),
                 tuple(float(i.get("weight", 1.0)) for i in items))


def _from_pairs(items: list) -> Blend:
    """``[w, prefix, w, prefix, ...]``."""
    if len(items) % 2 or not all(_is_number(w) for w in items[::2]):
        raise ValueError(f"data.blend {items!r}: give [weight, prefix, weight, prefix, ...], "
                         f"prefixes only, or [{{path: PREFIX, weight: W}}, ...]")
    return Blend(tuple(_prefix(p) for p in items[1::2]), tuple(float(w) for w in items[::2]))


def parse(items: list) -> Blend:
    """A :class:`Blend` from any accepted ``data.blend`` form (must not be empty)."""
    items = list(items)
    if not items:
        raise ValueError("data.blend is empty")
    if any(isinstance(i, dict) for i in items):
        blend = _from_dicts(items)
    elif all(isinstance(i, str) and not _is_number(i) for i in items):
        blend = Blend(tuple(_prefix(p) for p in items))
    else:
        blend = _from_pairs(items)
    if blend.weights is not None and not all(w > 0 for w in blend.weights):
        raise ValueError(f"data.blend weights must be > 0, got {list(blend.weights)}")
    if len(blend.prefixes) == 1:
        return Blend(blend.prefixes)
    return blend


def split_text(split: Any) -> str:
    """megatron's split string from ``[98, 2, 0]`` (or such a string)."""
    if isinstance(split, str):
        return split
    return ",".join(np.format_float_positional(float(x), trim="-") for x in split)


def split_vector(split: Any) -> list[float]:
    """``[969, 30, 1]`` (or ``"969,30,1"``) -> normalized train/valid/test fractions."""
    try:
        parts = [float(p) for p in split_text(split).split(",")]
    except (TypeError, ValueError):
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"data.split({split!r}) must be 1 to 3 non-negative shares with a "
                         f"positive sum, e.g. [969,30,1] (train, valid, test)")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_ranges(num_docs: int, split: Any) -> list[Optional[tuple[int, int]]]:
    """Document ranges of each split, as megatron cuts them (None: the split is empty)."""
    vector, bounds, out = split_vector(split), [0.0], []
    for fraction in vector:
        bounds.append(bounds[-1] + fraction)
    for lo, hi, fraction in zip(bounds, bounds[1:], vector):
        out.append((round(lo * num_docs), round(hi * num_docs)) if fraction > 0 else None)
    return out


def document_count(prefix: str) -> int:
    """Sequences (= documents, as :mod:`preprocess` writes them) in a dataset's index."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    with quiet_megatron():
        return len(_IndexReader(prefix + ".idx", multimodal=False))


def missing_files(blend: Blend) -> list[str]:
    """``.bin`` / ``.idx`` files the blend names that do not exist."""
    return [p + s for p in blend.prefixes for s in (".bin", ".idx") if not os.path.isfile(p + s)]


def check_documents(blend: Blend, split: Any) -> None:
    """Every prefix gives each non-empty split at least one document."""
    for prefix in blend.prefixes:
        n = document_count(prefix)
        for name, rng in zip(SPLIT_NAMES, split_ranges(n, split)):
            if rng is not None and rng[1] <= rng[0]:
                raise ValueError(f"{prefix}: {n} documents leave none for the {name} split of "
                                 f"data.split=[{split_text(split)}]; add documents or change it")


def check_meta(blend: Blend, vocab_size: int) -> Optional[dict]:
    """One tokenizer for every prefix, and ids that fit ``vocab_size``. Returns a sidecar."""
    metas = [m for m in map(preprocess.read_meta, blend.prefixes) if m is not None]
    if len({m["tokenizer"] for m in metas}) > 1:
        raise ValueError(f"data.blend mixes datasets made with different tokenizers: "
                         f"{list(blend.prefixes)}")
    for prefix, meta in zip(blend.prefixes, metas):
        if meta["vocab_size"] > vocab_size:
            raise ValueError(f"{prefix}: tokenizer vocab {meta['vocab_size']} > "
                             f"model.vocab_size({vocab_size}); raise model.vocab_size")
    return metas[0] if metas else None


def problems(items: list, split: Any, vocab_size: Optional[int] = None) -> list[str]:
    """Preflight lines for ``data.blend`` / ``data.split`` (an empty blend is the default),
    and, given ``vocab_size``, for the datasets' tokenizers (from their sidecars)."""
    out = []
    try:
        split_vector(split)
    except ValueError as err:
        out.append(str(err))
    if not items:
        return out
    try:
        blend = parse(items)
    except ValueError as err:
        return out + [str(err)]
    missing = missing_files(blend)
    if missing:
        return out + [f"data.blend names missing files: {missing[:4]}; "
                      f"make them with `mptk-data preprocess`"]
    return out or _file_problems(blend, split, vocab_size)  # needs a valid split


def _file_problems(blend: Blend, split: Any, vocab_size: Optional[int]) -> list[str]:
    """Document counts per split and, given ``vocab_size``, tokenizer sidecars."""
    try:
        check_documents(blend, split)
        if vocab_size is not None:
            check_meta(blend, vocab_size)
    except ValueError as err:
        return [str(err)]
    return []


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """What megatron's dataset config reads of a tokenizer (ids only; no text here)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of megatron's index cache key."""
        return {"class": "mptk", "vocab_size": self.vocab_size, "eod": self.eod}


def gpt_config(blend: Optional[Blend], split: Any, seq_length: int, seed: int, cache: str,
               tok: TokenizerInfo, per_split: Optional[list[Optional[Blend]]] = None):
    """megatron's ``GPTDatasetConfig``: no masks built (the recipe makes its own).

    ``blend`` is cut into splits by ``split``; alternatively ``per_split`` names the train,
    valid and test blends directly (None: that split is empty), as for the text caches whose
    held-out documents are chosen when they are tokenized.
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    where: dict[str, Any]
    if per_split is not None:
        where = {"blend_per_split": [None if b is None else b.megatron() for b in per_split]}
    else:
        assert blend is not None  # every caller passes a blend or per_split
        where = {"blend": blend.megatron(), "split": split_text(split)}
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, path_to_cache=cache, tokenizer=tok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005, **where)


@contextmanager
def file_lock(folder: str | Path):
    """An exclusive lock on ``folder/.lock`` (one builder per filesystem)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


@contextmanager
def alone():
    """Let megatron's dataset code run as if no process group existed.

    Its builder otherwise calls barriers on the world group (and only global rank 0 may
    build); here the callers are ordered by :func:`file_lock` instead, so every rank can
    call :func:`build` on its own, e.g. inside the loop's ``rank_zero_first``.
    """
    saved = dist.is_initialized, dist.get_rank
    dist.is_initialized, dist.get_rank = (lambda: False), (lambda group=None: 0)
    try:
        yield
    finally:
        dist.is_initialized, dist.get_rank = saved


@contextmanager
def quiet_megatron():
    """megatron's dataset logging (INFO lines per index) off for a while."""
    import logging

    logger = logging.getLogger("megatron.core.datasets")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _files(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.npy")) if folder.is_dir() else 0


def build(config, sizes: list[int], log=print) -> list:
    """The train / valid / test datasets (None where the split is empty), cached."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    cache, start = Path(config.path_to_cache), time.perf_counter()
    with file_lock(cache), alone(), quiet_megatron():
        before = _files(cache)
        datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        built = _files(cache) - before
    if built:
        log(f"built {built} megatron index files in {cache} "
            f"({time.perf_counter() - start:.1f}s; reused by later runs)")
    return datasets
