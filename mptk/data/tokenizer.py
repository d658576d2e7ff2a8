"""Byte-level BPE tokenizer, trained locally with HF ``tokenizers`` in seconds."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|endoftext|>"
"""The end-of-document special token, appended after every document."""


def _blank() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (GPT-2 style pre-tokenization)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Train on ``texts`` with ``vocab_size`` entries (incl. :data:`EOD`), save to ``path``."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOD}), got {vocab_size}")
    tok = _blank()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text stays text
    tok.save(str(path))
    return tok


def load(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file (e.g. saved by :func:`train_bpe`), or an HF tokenizer folder
    (``tokenizer.json``, or GPT-2 style ``vocab.json`` + ``merges.txt``).

    The one loader of the package: the training caches and ``mptk-data`` both read through
    it, so a tokenizer always encodes the same way. Local files only: nothing is downloaded.
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = _from_vocab_merges(path)
    else:
        raise FileNotFoundError(f"{path}: no tokenizer.json, nor vocab.json + merges.txt")
    tok.encode_special_tokens = True  # a literal special token in the text stays text
    return tok


def given_or_trained(given: str, texts: list[str], vocab_size: int,
                     path: str | Path) -> Tokenizer:
    """``given`` (a tokenizer.json or HF folder, saved to ``path`` as the data's tokenizer)
    when set, else a BPE trained on ``texts``."""
    if not given:
        return train_bpe(texts, vocab_size, path)
    tok = load(given)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"data.tokenizer: {given} has {tok.get_vocab_size()} tokens > "
                         f"model.vocab_size({vocab_size}); set model.vocab_size="
                         f"{tok.get_vocab_size()} or more")
    tok.save(str(path))
    return tok


def digest(given: str) -> str:
    """A short hash of a given tokenizer's definition (a cache key part); "" when none."""
    import hashlib

    return hashlib.sha256(load(given).to_str().encode()).hexdigest()[:16] if given else ""


def _from_vocab_merges(folder: Path) -> Tokenizer:
    """A byte-level BPE from GPT-2 style files."""
    tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


EOD_CANDIDATES = (EOD, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
"""End-of-document tokens of common tokenizers (GPT-2, Llama 2, Llama 3, Gemma), first wins."""


def eod_id(tok: Tokenizer) -> int:
    """The id of the end-of-document token: the first of :data:`EOD_CANDIDATES` present."""
    for name in EOD_CANDIDATES:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ValueError(f"tokenizer has none of {list(EOD_CANDIDATES)} for the end of a document")


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (batched, parallel in Rust), without the EOD."""
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [enc.ids for enc in fast(texts, add_special_tokens=False)]
