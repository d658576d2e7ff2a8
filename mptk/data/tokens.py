"""Token caches and deterministic samplers.

:func:`prepare` turns the configured text into a cache folder (tokenizer.json, train.npy,
heldout.npy, meta.json), built once and reused. :class:`TokenSampler` and
:func:`eval_batches` cut a 1-D token array into ``seq_length`` windows. Any source that
yields a 1-D token array per split (e.g. megatron-core indexed datasets) fits them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mptk.config.schema import DataConfig, DataSource
from mptk.data import corpus, tokenizer
from mptk.data.order import global_samples

FORMAT_VERSION = 1
"""Bump when the cache layout or the tokenization changes: old caches are then ignored."""

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
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{cfg.source.value}-v{vocab_size}-{digest[:16]}"


def cache_path(cfg: DataConfig, vocab_size: int) -> Path:
    """Where :func:`prepare` puts (or finds) the cache for this config."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    return root / cache_key(cfg, source_files(cfg), vocab_size)


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


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65536 else np.int32)


def concat_with_eod(docs: list[list[int]], eod: int, dtype: np.dtype) -> np.ndarray:
    """Documents end to end, each followed by the EOD id."""
    out = np.empty(sum(len(d) + 1 for d in docs), dtype=dtype)
    pos = 0
    for ids in docs:
        out[pos:pos + len(ids)] = ids
        out[pos + len(ids)] = eod
        pos += len(ids) + 1
    return out


def _build(folder: Path, cfg: DataConfig, files: list[Path], vocab_size: int, log) -> None:
    """Read, train the tokenizer on the train documents, tokenize both splits, write."""
    start = time.perf_counter()
    texts = corpus.read_documents(files, int(cfg.max_chars))
    held = heldout_indices(len(texts), cfg.heldout_fraction)
    split_texts = {
        "train": [t for i, t in enumerate(texts) if i not in held],
        "heldout": [t for i, t in enumerate(texts) if i in held],
    }
    tok = tokenizer.train_bpe(split_texts["train"], vocab_size, folder / "tokenizer.json")
    log(f"trained byte-level BPE (vocab {tok.get_vocab_size()}) "
        f"in {time.perf_counter() - start:.1f}s")
    dtype = token_dtype(tok.get_vocab_size())
    counts = {}
    for split, docs in split_texts.items():
        ids = tokenizer.encode_documents(tok, docs)
        arr = concat_with_eod(ids, tokenizer.eod_id(tok), dtype)
        np.save(folder / f"{split}.npy", arr)
        counts[split] = {"documents": len(docs), "tokens": int(arr.size),
                         "chars": sum(len(t) for t in docs)}
    meta = _meta(cfg, tok, dtype, counts, time.perf_counter() - start)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _meta(cfg: DataConfig, tok, dtype: np.dtype, counts: dict, seconds: float) -> dict:
    """The meta.json contents."""
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source.value,
        "vocab_size": tok.get_vocab_size(),
        "eod_id": tokenizer.eod_id(tok),
        "dtype": dtype.name,
        "documents": sum(c["documents"] for c in counts.values()),
        "chars": sum(c["chars"] for c in counts.values()),
        "splits": counts,
        "seconds": round(seconds, 2),
    }


def _publish(tmp: Path, target: Path) -> Path:
    """Rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare(cfg: DataConfig, vocab_size: int, log: Callable[[str], None] = print) -> Path:
    """Build (once) and return the token cache folder for ``cfg``; later calls reuse it.

    Built in a temporary folder beside the target and renamed into place, so concurrent
    callers (e.g. every rank) never see a half-written cache.
    """
    files = source_files(cfg)
    root = Path(os.path.expanduser(cfg.cache_dir))
    target = root / cache_key(cfg, files, vocab_size)
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    log(f"tokenizing {len(files)} {cfg.source.value} files "
        f"(first {int(cfg.max_chars):,} chars) into {_pretty(target)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        _build(tmp, cfg, files, vocab_size, log)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """One split's 1-D token array, memory-mapped read-only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.load(Path(folder) / f"{split}.npy", mmap_mode="r")


def load_tokenizer(folder: str | Path):
    """The cache's tokenizer."""
    return tokenizer.load(Path(folder) / "tokenizer.json")


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def num_windows(tokens: np.ndarray, seq_length: int) -> int:
    """Non-overlapping ``seq_length`` windows, each with one extra token for the labels."""
    return (len(tokens) - 1) // seq_length


def windows(tokens: np.ndarray, seq_length: int, indices) -> dict[str, torch.Tensor]:
    """Windows ``indices`` as ``tokens`` / ``labels`` (shifted by one) LongTensors."""
    rows = [np.asarray(tokens[i * seq_length:i * seq_length + seq_length + 1])
            for i in indices]
    block = torch.from_numpy(np.stack(rows).astype(np.int64))
    return {"tokens": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}


class TokenSampler:
    """Deterministic training batches: a pure function of (step, micro, dp rank).

    Global sample ``g`` is window ``perm(g // N)[g % N]`` with a fresh permutation per
    epoch, so one step covers the same samples whatever the dp / grad-acc split.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int):
        self.tokens = tokens
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_samples = num_windows(tokens, self.seq_length)
        if self.num_samples < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for seq_length {seq_length}")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (cached; the last few epochs are kept)."""
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng(self.seed + epoch)
            self._perms[epoch] = rng.permutation(self.num_samples)
        return self._perms[epoch]

    def window_index(self, sample: int) -> int:
        """Window of global sample ``sample``, wrapping into later epochs."""
        epoch, pos = divmod(int(sample), self.num_samples)
        return int(self.permutation(epoch)[pos])

    def sample_indices(self, step, micro_index, micro_batch_size, grad_acc, dp_rank, dp_size):
        """Global sample indices of one micro-batch on one dp rank."""
        return global_samples(step, micro_index, micro_batch_size, grad_acc, dp_rank, dp_size)

    def batch(self, step: int, micro_index: int, micro_batch_size: int, grad_acc: int,
              dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
        """``tokens`` and ``labels`` LongTensors of shape [micro_batch_size, seq_length]."""
        samples = self.sample_indices(step, micro_index, micro_batch_size, grad_acc,
                                      dp_rank, dp_size)
        return windows(self.tokens, self.seq_length, [self.window_index(s) for s in samples])


def eval_batches(tokens: np.ndarray, seq_length: int, micro_batch_size: int, n: int,
                 dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """``n`` micro-batches of held-out windows in fixed order, sharded over dp.

    Batch ``j`` on rank ``r`` holds windows ``j*mbs*dp + r*mbs + row`` (wrapping when the
    split is short), so together the ranks cover the first ``n*mbs*dp`` windows.
    """
    total = num_windows(tokens, seq_length)
    if total < 1:
        raise ValueError(f"held-out split ({len(tokens)} tokens) is shorter than "
                         f"seq_length {seq_length} + 1")
    out = []
    for j in range(n):
        base = j * micro_batch_size * dp_size + dp_rank * micro_batch_size
        idx = [(base + row) % total for row in range(micro_batch_size)]
        out.append(windows(tokens, seq_length, idx))
    return out
