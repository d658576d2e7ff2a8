"""A rank's view of megatron-core indexed datasets: the one dataset code of every text source.

:class:`IndexedData` has the two methods the loop calls: ``batch(step, micro)`` and
``eval_batches()``. Its splits are megatron ``GPTDataset``s built by megatron's
``BlendedMegatronDatasetBuilder`` with ``train.steps * train.global_batch_size`` training
samples, from one of:

- ``data.source=indexed``: the train / valid / test splits of ``data.blend`` (see
  :mod:`mptk.data.blend`), cut by ``data.split``;
- ``data.source=stdlib`` (the default) or ``files``: the ``train`` and ``heldout`` datasets
  that :func:`mptk.data.tokens.prepare` wrote once into the cache (every k-th document held
  out, ``data.heldout_fraction``), as megatron's train and valid splits.

Exact resume: the position in the data derives from the step alone. Global sample ``g`` of
micro-batch ``micro`` on dp rank ``r`` at step ``s`` is::

    g = s * global_batch + micro * mbs * dp + r * mbs + row        (row < mbs)

so after ``k`` steps the run has consumed samples ``[0, k * global_batch)`` (consumed
samples = step * global_batch), a resumed run at step ``k`` reads exactly what an
uninterrupted one would, tp/pp peers (same dp rank) read the same samples, and the union of
one step over dp does not depend on dp. megatron's shuffle depends on the seed, the
sequence length, the split and the sample counts: changing ``train.steps`` within the first
epoch keeps the order; changing the others gives a new one.

An empty ``data.blend`` means the stdlib corpus, tokenized once (documents in a fixed
shuffled order, so megatron's document-range split is a random one) into
``<cache_dir>/indexed-stdlib-*`` as ``stdlib.bin/.idx``, beside its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mptk.config.schema import DataSource, RunConfig
from mptk.data import blend as blends
from mptk.data import corpus, preprocess, tokenizer, tokens
from mptk.data.order import Place, global_samples  # noqa: F401  (global_samples re-exported)

STDLIB_VERSION = 1
"""Bump when the stdlib .bin/.idx layout changes: old caches are then ignored."""

STDLIB_SHUFFLE_SEED = 0
"""Fixed document order of the stdlib dataset (part of its identity, not of the run's seed)."""


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """``tokens`` / ``labels`` LongTensors [len(indices), seq] (indices wrap the dataset)."""
    rows = [dataset[int(i) % len(dataset)] for i in indices]
    return {key: torch.stack([r[key] for r in rows]).long() for key in ("tokens", "labels")}


def fixed_batches(dataset, micro_batch_size: int, n: int, dp_rank: int,
                  dp_size: int) -> list[dict[str, torch.Tensor]]:
    """``n`` micro-batches in fixed order, sharded over dp: batch ``j`` on rank ``r`` holds
    samples ``j*mbs*dp + r*mbs + row`` (wrapping when the split is short), so together the
    ranks cover the first ``n*mbs*dp`` samples, whatever the dp size."""
    out = []
    for j in range(n):
        base = j * micro_batch_size * dp_size + dp_rank * micro_batch_size
        out.append(collate(dataset, [base + row for row in range(micro_batch_size)]))
    return out


@dataclass(slots=True)
class IndexedData:
    """Batches from megatron ``GPTDataset`` splits for one dp rank (same on its tp/pp peers)."""

    train: Any
    valid: Any
    test: Optional[Any]
    place: Place

    @classmethod
    def prepare(cls, cfg: RunConfig, layout, vocab_size: int, log=print,
                dp_rank: Optional[int] = None) -> IndexedData:
        """Build (once, cached) the splits; bind to this rank's dp place."""
        place = Place.of(cfg, layout, dp_rank)
        train, valid, test = datasets(cfg, layout.dp, vocab_size, log)
        return cls(train=train, valid=valid, test=test, place=place)

    def samples(self, step: int, micro: int) -> list[int]:
        """Global sample indices of ``batch(step, micro)``."""
        return self.place.samples(step, micro)

    def batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return self.place.cut(collate(self.train, self.samples(step, micro)))

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._fixed(self.valid)

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        """Like :meth:`eval_batches` on the test split (needs a test share in data.split)."""
        if self.test is None:
            raise ValueError("data.split has no test share (e.g. use data.split=[969,30,1])")
        return self._fixed(self.test)

    def _fixed(self, split) -> list[dict[str, torch.Tensor]]:
        p = self.place
        return [p.cut(b) for b in
                fixed_batches(split, p.micro_batch_size, p.eval_batches, p.dp_rank, p.dp_size)]


# ---------------------------------------------------------------------------------------
# Building the splits
# ---------------------------------------------------------------------------------------


def sample_counts(cfg: RunConfig, dp: int) -> list[int]:
    """Samples per split: the whole run's training, one evaluation's valid and test."""
    evals = cfg.train.eval_batches * cfg.train.micro_batch_size * dp
    return [cfg.train.steps * cfg.train.global_batch_size, evals, evals]


def resolve_blend(cfg: RunConfig, vocab_size: int, log=print) -> blends.Blend:
    """``data.blend``, or the stdlib default (built on first use)."""
    if cfg.data.blend:
        blend = blends.parse(cfg.data.blend)
        missing = blends.missing_files(blend)
        if missing:
            raise FileNotFoundError(f"data.blend names missing files: {missing[:4]}")
        return blend
    return blends.Blend((stdlib_prefix(cfg, vocab_size, log),))


def index_cache(cfg: RunConfig) -> str:
    """Where megatron's index caches go."""
    return str(Path(os.path.expanduser(cfg.data.cache_dir)).resolve() / "megatron-indices")


def datasets(cfg: RunConfig, dp: int, vocab_size: int, log=print) -> list:
    """Train / valid / test datasets of the configured source (valid is required)."""
    if cfg.data.source in (DataSource.stdlib, DataSource.files):
        config = text_config(cfg, vocab_size, log)
    else:
        config = blend_config(cfg, vocab_size, log)
    train, valid, test = blends.build(config, sample_counts(cfg, dp), log=log)
    if train is None or valid is None:
        raise ValueError(f"data.split={list(cfg.data.split)} needs train and valid shares")
    return [train, valid, test]


def blend_config(cfg: RunConfig, vocab_size: int, log=print):
    """megatron's dataset config for ``data.blend`` (or the stdlib default) cut by data.split."""
    blend = resolve_blend(cfg, vocab_size, log)
    meta = blends.check_meta(blend, vocab_size)
    blends.check_documents(blend, cfg.data.split)
    tok = blends.TokenizerInfo(vocab_size=vocab_size, eod=meta["eod_id"] if meta else 0)
    return blends.gpt_config(blend, cfg.data.split, cfg.model.seq_length, cfg.train.seed,
                             index_cache(cfg), tok)


def text_config(cfg: RunConfig, vocab_size: int, log=print):
    """megatron's dataset config for a text source's cache: its ``train`` dataset as the train
    split, its ``heldout`` one as the valid split (the cache is built on first use)."""
    folder = tokens.prepare(cfg.data, vocab_size, log=log)
    meta = tokens.load_meta(folder)
    check_lengths(meta, cfg.model.seq_length)
    per_split = [blends.Blend((tokens.split_prefix(folder, s),)) for s in tokens.SPLITS]
    tok = blends.TokenizerInfo(vocab_size=vocab_size, eod=meta["eod_id"])
    return blends.gpt_config(None, None, cfg.model.seq_length, cfg.train.seed,
                             index_cache(cfg), tok, per_split=per_split + [None])


def check_lengths(meta: dict, seq_length: int) -> None:
    """Each split of a text cache holds one sample of ``seq_length`` + 1 tokens at least
    (megatron would otherwise fail deep inside its index builder)."""
    train, held = (meta["splits"][s]["tokens"] for s in tokens.SPLITS)
    if train - 1 < seq_length:
        raise ValueError(f"{train} tokens are too few for seq_length {seq_length}")
    if held - 1 < seq_length:
        raise ValueError(f"held-out split ({held} tokens) is shorter than "
                         f"seq_length {seq_length} + 1")


# ---------------------------------------------------------------------------------------
# The stdlib default, as an indexed dataset
# ---------------------------------------------------------------------------------------


def stdlib_key(cfg: RunConfig, files: list[Path], vocab_size: int) -> str:
    """Folder name: readable prefix plus a hash of everything that shapes the tokens."""
    parts = {"version": STDLIB_VERSION, "files": [[str(p), p.stat().st_size] for p in files],
             "max_chars": int(cfg.data.max_chars), "vocab_size": int(vocab_size),
             "split": blends.split_vector(cfg.data.split)}
    if cfg.data.tokenizer:  # the key of a trained-tokenizer cache stays as it always was
        parts["tokenizer"] = tokenizer.digest(cfg.data.tokenizer)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"indexed-stdlib-v{vocab_size}-{digest[:16]}"


def stdlib_prefix(cfg: RunConfig, vocab_size: int, log=print) -> str:
    """The stdlib corpus as ``stdlib.bin/.idx`` in the cache dir (built on first use, the
    same way as :func:`mptk.data.tokens.prepare`: in a temporary folder renamed into place)."""
    files = corpus.stdlib_files()
    root = Path(os.path.expanduser(cfg.data.cache_dir)).resolve()
    folder = root / stdlib_key(cfg, files, vocab_size)
    if _stdlib_built(folder):
        return str(folder / "stdlib")
    log(f"preprocessing {len(files)} stdlib files (first {int(cfg.data.max_chars):,} "
        f"chars) into {folder}/stdlib.bin/.idx (once; later runs reuse it)")
    tokens.build_once(folder, lambda tmp: _build_stdlib(tmp, cfg, files, vocab_size),
                      complete=_stdlib_built)
    meta = preprocess.read_meta(folder / "stdlib")
    assert meta is not None  # build_once publishes only a complete folder (sidecar present)
    log(f"{meta['documents']:,} documents, {meta['tokens']:,} tokens in {folder}")
    return str(folder / "stdlib")


def _stdlib_built(folder: Path) -> bool:
    """The sidecar is written last, so its presence marks a complete dataset."""
    return preprocess.read_meta(folder / "stdlib") is not None


def _build_stdlib(tmp: Path, cfg: RunConfig, files: list[Path], vocab_size: int) -> None:
    """Tokenizer from the train share, then every document (shuffled once, with a fixed
    seed, so that megatron's document-range split is a random one)."""
    texts = corpus.read_documents(files, int(cfg.data.max_chars))
    order = np.random.default_rng(STDLIB_SHUFFLE_SEED).permutation(len(texts))
    texts = [texts[i] for i in order]
    train_range = blends.split_ranges(len(texts), cfg.data.split)[0] or (0, len(texts))
    tok = tokenizer.given_or_trained(cfg.data.tokenizer, texts[:max(1, train_range[1])],
                                     vocab_size, tmp / "tokenizer.json")
    tokens.write_split(tmp, "stdlib", texts, tok, "stdlib")
