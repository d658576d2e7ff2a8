"""Preprocessing throughput: the stdlib corpus -> megatron .bin/.idx, in tokens/s.

    python bench/preprocess_throughput.py --workers 2 [--vocab-size 4096] [--max-files N]

Trains a byte-level BPE on the first 2M characters (not timed), then times
``mptk.data.preprocess.preprocess_files`` over every stdlib ``.py`` file. Besides wall-clock
tokens/s it prints tokens per CPU-second (this process and its workers), which a busy
machine disturbs less.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mptk.data import corpus, preprocess, tokenizer


def cpu_seconds() -> float:
    """User + system time of this process and its finished children."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-files", type=int, default=0, help="0 = every stdlib file")
    args = ap.parse_args()
    files = corpus.stdlib_files()[: args.max_files or None]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        texts = corpus.read_documents(files, 2_000_000)
        tok = tokenizer.train_bpe(texts, args.vocab_size, Path(tmp) / "tokenizer.json")
        print(f"tokenizer: vocab {tok.get_vocab_size()} in {time.perf_counter() - start:.1f}s "
              f"(not timed below)")
        preprocess.preprocess(iter([("warm-up", 7)]), tok, Path(tmp) / "warm")  # imports
        for workers in args.workers:
            cpu = cpu_seconds()
            summary = preprocess.preprocess_files([str(f) for f in files], tok,
                                                  Path(tmp) / f"stdlib{workers}", workers=workers)
            cpu = cpu_seconds() - cpu
            print(f"workers={workers}: {summary.line()}")
            print(f"RESULT workers={workers} tokens_per_s={summary.tokens_per_s:.0f} "
                  f"tokens_per_cpu_s={summary.tokens / cpu:.0f}")


if __name__ == "__main__":
    main()
