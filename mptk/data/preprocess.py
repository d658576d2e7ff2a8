"""Text -> megatron-core indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``).

Every document becomes one sequence: its token ids followed by the end-of-document id.
Inputs are JSONL files (``.jsonl`` / ``.json``: one JSON object a line, text under a key)
or plain-text files (one document per file). Tokenization runs in ``workers`` spawned
processes; documents keep their input order, so the output is deterministic. A sidecar
``<prefix>.meta.json`` records the tokenizer (vocab size, EOD id, hash) and the counts;
it is written last, so its presence marks a complete dataset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from mptk.data import tokenizer as bpe

JSONL_SUFFIXES = (".jsonl", ".json")
"""Files read as one JSON document a line; any other file is one plain-text document."""

EOD_CANDIDATES = bpe.EOD_CANDIDATES
"""End-of-document tokens looked for, in order, when none is named."""

META_SUFFIX = ".meta.json"

CHUNK_DOCS, CHUNK_BYTES = 256, 1 << 18
"""A worker task holds at most this many documents or bytes of text."""


# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def find_eod(tok: Tokenizer, eod_token: Optional[str] = None) -> int:
    """The id of ``eod_token``, else of the first of :data:`EOD_CANDIDATES` present."""
    names = [eod_token] if eod_token else list(EOD_CANDIDATES)
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    raise ValueError(f"tokenizer has none of {names} for the end of a document; "
                     f"name one with --eod-token")


def tokenizer_digest(tok: Tokenizer) -> str:
    """A short hash of the tokenizer's full definition."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files matched by paths or globs (``**`` recurses), in the order given, de-duplicated."""
    found: list[Path] = []
    for pattern in patterns:
        names = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not names:
            raise FileNotFoundError(f"input {pattern!r} matched no files")
        found += [Path(n).resolve() for n in names if os.path.isfile(n)]
    return list(dict.fromkeys(found))


def iter_documents(paths: Iterable[Path], json_key: str = "text") -> Iterator[tuple[str, int]]:
    """``(text, bytes read)`` per document, in file order."""
    for path in paths:
        if Path(path).suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(Path(path), json_key)
        else:
            data = Path(path).read_bytes()
            yield data.decode("utf-8", errors="replace"), len(data)


def _jsonl_documents(path: Path, key: str) -> Iterator[tuple[str, int]]:
    """One document per non-blank line of a JSONL file."""
    with open(path, "rb") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise ValueError(f"{path}:{number}: no string field {key!r} "
                                 f"(set the field with --json-key)")
            yield record[key], len(line)


def chunks(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    """Documents grouped into worker tasks: ``(texts, bytes)``."""
    texts, size = [], 0
    for text, nbytes in docs:
        texts.append(text)
        size += nbytes
        if len(texts) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield texts, size
            texts, size = [], 0
    if texts:
        yield texts, size


# ---------------------------------------------------------------------------------------
# Encoding (runs in workers)
# ---------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eod: int, dtype: str, threads: bool) -> None:
    """Worker start: one tokenizer per process (Rust threads off when processes are many)."""
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    _WORKER.update(tok=tok, eod=eod, dtype=np.dtype(dtype))


def _encode(task: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray, int]:
    """A task's non-blank texts as one array (each document's ids, then the EOD), the
    document lengths (EOD included) and the task's bytes."""
    texts, size = task
    ids = bpe.encode_documents(_WORKER["tok"], [t for t in texts if t.strip()])
    lengths = np.array([len(d) + 1 for d in ids], dtype=np.int64)
    flat = np.full(int(lengths.sum()), _WORKER["eod"], dtype=_WORKER["dtype"])
    ends = np.cumsum(lengths)
    for doc, end in zip(ids, ends):
        flat[end - 1 - len(doc):end - 1] = doc
    return flat, lengths, size


def _encoded(tasks: Iterator, tok: Tokenizer, eod: int, dtype, workers: int) -> Iterator:
    """Encoded tasks in input order, in ``workers`` processes (1: this process)."""
    init = (tok.to_str(), eod, np.dtype(dtype).name)
    if workers <= 1:
        _init_worker(*init, threads=True)
        yield from map(_encode, tasks)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, _init_worker, (*init, False)) as pool:
        yield from pool.imap(_encode, tasks, chunksize=1)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Summary:
    """What one preprocessing run wrote."""

    prefix: str
    documents: int = 0
    """Documents written (blank ones are skipped)."""
    read: int = 0
    """Documents read."""
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return self.read - self.documents

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.documents:,} documents ({self.skipped} blank skipped), "
                f"{self.tokens:,} tokens, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f}s "
                f"= {self.tokens_per_s:,.0f} tokens/s -> {self.prefix}.bin/.idx")


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (ids run 0..vocab_size-1 and uint16 holds 0..65535, so
    vocab_size <= 65536), else int32. The one rule for every token file mptk writes."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _progress(enabled: bool):
    """A rich progress bar over input bytes (a no-op when disabled)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("[bold]tokenizing"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[docs]}"))
    return Progress(*columns, disable=not enabled, transient=False)


def _write(builder, encoded: Iterator, summary: Summary, progress, task) -> None:
    """Append every encoded document to ``builder``, one sequence per document."""
    for flat, lengths, size in encoded:
        start = 0
        for length in lengths.tolist():
            builder.add_document(flat[start:start + length], [length])
            start += length
        summary.documents += len(lengths)
        summary.tokens += int(flat.size)
        summary.bytes += size
        progress.update(task, advance=size, docs=f"{summary.documents:,} docs")


def preprocess(docs: Iterable[tuple[str, int]], tok: Tokenizer, prefix: str | Path, *,
               eod_token: Optional[str] = None, workers: int = 1,
               total_bytes: Optional[int] = None, progress: bool = False,
               sources: Optional[list[str]] = None) -> Summary:
    """Tokenize ``docs`` (``(text, bytes)`` pairs) into ``prefix.bin`` / ``prefix.idx``.

    Written under a temporary name and renamed into place; the meta file comes last.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    start, prefix = time.perf_counter(), str(Path(os.path.expanduser(str(prefix))).resolve())
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    eod, dtype = find_eod(tok, eod_token), token_dtype(tok.get_vocab_size())
    tmp = f"{prefix}.tmp{os.getpid()}"
    if total_bytes is None:
        docs = list(docs)
        total_bytes = sum(n for _, n in docs)
    summary, builder = Summary(prefix), IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        with _progress(progress) as bar:
            task = bar.add_task("tokenize", total=total_bytes, docs="")
            tasks = _counting(chunks(docs), summary)
            _write(builder, _encoded(tasks, tok, eod, dtype, workers), summary, bar, task)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        _remove(tmp + ".bin", tmp + ".idx")
        raise
    summary.seconds = time.perf_counter() - start
    _publish(tmp, prefix, _meta(tok, eod, dtype, summary, sources))
    return summary


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _counting(tasks: Iterator, summary: Summary) -> Iterator:
    """Pass tasks through, counting every document read (blank ones included)."""
    for task in tasks:
        summary.read += len(task[0])
        yield task


def _meta(tok: Tokenizer, eod: int, dtype, summary: Summary, sources) -> dict:
    """The sidecar's contents."""
    return {"format": "megatron-indexed-v1", "vocab_size": tok.get_vocab_size(),
            "eod_id": eod, "dtype": np.dtype(dtype).name, "tokenizer": tokenizer_digest(tok),
            **{k: v for k, v in asdict(summary).items() if k != "prefix"},
            "sources": list(sources or [])}


def _publish(tmp: str, prefix: str, meta: dict) -> None:
    """Rename the temporary .bin/.idx into place, then write the meta file."""
    _remove(prefix + META_SUFFIX)  # a stale sidecar must not vouch for the new files
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    Path(prefix + META_SUFFIX).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(prefix: str | Path) -> Optional[dict]:
    """The sidecar of ``prefix``, or None (e.g. data preprocessed by megatron's own tool)."""
    path = Path(str(prefix) + META_SUFFIX)
    return json.loads(path.read_text()) if path.is_file() else None


def preprocess_files(inputs: list[str], tok: Tokenizer, prefix: str | Path, *,
                     json_key: str = "text", **kw) -> Summary:
    """:func:`preprocess` over files matched by ``inputs`` (paths or globs)."""
    paths = expand_inputs(inputs)
    total = sum(p.stat().st_size for p in paths)
    return preprocess(iter_documents(paths, json_key), tok, prefix, total_bytes=total,
                      sources=[str(p) for p in paths[:1000]], **kw)
