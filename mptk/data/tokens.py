"""The text sources (the stdlib default, ``data.source=files``) tokenized once into the cache.

:func:`prepare` turns the configured text into a cache folder, built once and reused::

    tokenizer.json                      byte-level BPE trained on the train documents
    train.bin / .idx / .meta.json       megatron-core indexed dataset (one sequence a document)
    heldout.bin / .idx / .meta.json     the held-out documents, the same format
    meta.json                           counts; written last, so it marks a complete cache

Both splits are written by :func:`mptk.data.preprocess.preprocess`, the writer behind
``mptk-data preprocess``, and read by the same megatron ``GPTDataset`` code as ``data=indexed``
(:mod:`mptk.data.indexed`): there is one token format and one sampler for every text source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mptk.config.schema import DataConfig, DataSource
from mptk.data import corpus, preprocess, tokenizer

FORMAT_VERSION = 2
"""Bump when the cache layout or the tokenization changes: old caches are then ignored
(2: megatron ``.bin/.idx`` splits instead of ``.npy`` token arrays)."""

SPLITS = ("train", "heldout")


# ---------------------------------------------------------------------------------------
# Cache key and folder
# ---------------------------------------------------------------------------------------


def source_files(cfg: DataConfig) -> list[Path]:
    """The files the configured source reads, in a fixed order."""
    if cfg.source == DataSource.stdlib:
        return corpus.stdlib_files()
    if cfg.source == DataSource.files:
        return corpus.files_from_globs(cfg.paths)
    raise ValueError(f"unknown data.source: {cfg.source!r}")


def cache_key(cfg: DataConfig, files: list[Path], vocab_size: int) -> str:
    """Folder name: readable prefix plus a hash of everything that shapes the tokens."""
    parts = {
        "version": FORMAT_VERSION,
        "source": cfg.source.value,
        "files": [[str(p), p.stat().st_size] for p in sorted(files)],
        "max_chars": int(cfg.max_chars),
        "vocab_size": int(vocab_size),
        "heldout_fraction": float(cfg.heldout_fraction),
    }
    if cfg.tokenizer:  # the key of a trained-tokenizer cache stays as it always was
        parts["tokenizer"] = tokenizer.digest(cfg.tokenizer)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{cfg.source.value}-v{vocab_size}-{digest[:16]}"


def cache_path(cfg: DataConfig, vocab_size: int) -> Path:
    """Where :func:`prepare` puts (or finds) the cache for this config."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    return root / cache_key(cfg, source_files(cfg), vocab_size)


def split_prefix(folder: str | Path, split: str) -> str:
    """The indexed-dataset prefix (path without ``.bin``/``.idx``) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return str(Path(folder).resolve() / split)


def _pretty(path: Path) -> str:
    """``path`` with the home directory shown as ``~``."""
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def _is_complete(folder: Path) -> bool:
    """A published cache always has its meta.json (it is written last, before rename)."""
    return (folder / "meta.json").is_file()


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------


def heldout_indices(n_docs: int, fraction: float) -> set[int]:
    """Every k-th document (k ~ 1/fraction), at least one; needs two documents or more."""
    if n_docs < 2:
        raise ValueError(f"need at least 2 documents to hold one out, got {n_docs}")
    k = max(2, round(1.0 / fraction)) if fraction > 0 else n_docs + 1
    held = {i for i in range(n_docs) if i % k == k - 1}
    return held or {n_docs - 1}


def write_split(folder: Path, name: str, texts: list[str], tok, source: str) -> dict:
    """``texts`` as ``folder/name.bin/.idx`` (one sequence a document, EOD-terminated), through
    the same writer as ``mptk-data preprocess``; returns the split's counts."""
    docs = [(t, len(t.encode("utf-8"))) for t in texts]
    summary = preprocess.preprocess(docs, tok, folder / name, sources=[source])
    return {"documents": summary.documents, "tokens": summary.tokens,
            "chars": sum(len(t) for t in texts)}


def _build(folder: Path, cfg: DataConfig, files: list[Path], vocab_size: int, log) -> None:
    """Read, train the tokenizer on the train documents, write both splits, then meta.json."""
    start = time.perf_counter()
    texts = corpus.read_documents(files, int(cfg.max_chars))
    held = heldout_indices(len(texts), cfg.heldout_fraction)
    split_texts = {
        "train": [t for i, t in enumerate(texts) if i not in held],
        "heldout": [t for i, t in enumerate(texts) if i in held],
    }
    tok = tokenizer.given_or_trained(cfg.tokenizer, split_texts["train"], vocab_size,
                                     folder / "tokenizer.json")
    what = f"read {cfg.tokenizer}" if cfg.tokenizer else "trained byte-level BPE"
    log(f"{what} (vocab {tok.get_vocab_size()}) in {time.perf_counter() - start:.1f}s")
    counts = {split: write_split(folder, split, docs, tok, cfg.source.value)
              for split, docs in split_texts.items()}
    meta = _meta(cfg, tok, counts, time.perf_counter() - start)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _meta(cfg: DataConfig, tok, counts: dict, seconds: float) -> dict:
    """The meta.json contents."""
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source.value,
        "vocab_size": tok.get_vocab_size(),
        "eod_id": tokenizer.eod_id(tok),
        "dtype": np.dtype(preprocess.token_dtype(tok.get_vocab_size())).name,
        "documents": sum(c["documents"] for c in counts.values()),
        "chars": sum(c["chars"] for c in counts.values()),
        "splits": counts,
        "seconds": round(seconds, 2),
    }


def _publish(tmp: Path, target: Path, complete: Callable[[Path], bool] = _is_complete) -> Path:
    """Rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not complete(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_once(target: Path, build: Callable[[Path], None],
               complete: Callable[[Path], bool] = _is_complete) -> Path:
    """Run ``build(tmp)`` in a temporary folder beside ``target`` and rename it into place.

    Concurrent callers (e.g. every rank) thus never see a half-written cache and need no
    lock file; whoever renames first wins, the others' copies are dropped. ``complete``
    tells a published folder from a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        _publish(tmp, target, complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare(cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print) -> Path:
    """Build (once) and return the cache folder for ``cfg``; later calls reuse it."""
    files = source_files(cfg)
    root = Path(os.path.expanduser(cfg.cache_dir))
    target = root / cache_key(cfg, files, vocab_size)
    if _is_complete(target):
        return target
    log(f"tokenizing {len(files)} {cfg.source.value} files "
        f"(first {int(cfg.max_chars):,} chars) into {_pretty(target)} as .bin/.idx")
    build_once(target, lambda tmp: _build(tmp, cfg, files, vocab_size, log))
    meta = load_meta(target)
    log(f"{meta['documents']} documents -> {meta['splits']['train']['tokens']:,} train / "
        f"{meta['splits']['heldout']['tokens']:,} held-out tokens in {meta['seconds']:.1f}s")
    return target


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_meta(folder: str | Path) -> dict:
    """The cache's meta.json."""
    return json.loads((Path(folder) / "meta.json").read_text())


def load_split(folder: str | Path, split: str) -> np.ndarray:
    """One split's tokens end to end (documents with their EODs), memory-mapped read-only.

    A megatron ``.bin`` is exactly that array, so this is for inspecting a cache; training
    reads the splits through :mod:`mptk.data.indexed`.
    """
    dtype = np.dtype(load_meta(folder)["dtype"])
    return np.memmap(split_prefix(folder, split) + ".bin", dtype=dtype, mode="r")


def load_tokenizer(folder: str | Path):
    """The cache's tokenizer."""
    return tokenizer.load(Path(folder) / "tokenizer.json")
