"""``mptk-data``: tokenizers and megatron indexed datasets for ``data=indexed``.

    mptk-data tokenizer OUT_DIR --train 'docs/*.jsonl' --vocab-size 32000
    mptk-data tokenizer OUT_DIR --from ~/models/gpt2          # tokenizer.json or HF folder
    mptk-data preprocess 'docs/*.jsonl' --tokenizer OUT_DIR --output-prefix data/web --workers 8
    mptk-train data=indexed 'data.blend=[data/web]' model.vocab_size=32000

Nothing is downloaded: tokenizers are trained here or read from disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mptk.data import corpus, preprocess, tokenizer


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--eod-token", default=None, help="end-of-document token (default: the "
                   f"first of {list(preprocess.EOD_CANDIDATES)} in the vocabulary)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mptk-data", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE, or import one from disk")
    tok.add_argument("out", help="folder to write tokenizer.json into")
    src = tok.add_mutually_exclusive_group(required=True)
    src.add_argument("--train", nargs="+", metavar="INPUT", help="JSONL / text files or globs")
    src.add_argument("--from", dest="source", help="tokenizer.json, or an HF tokenizer folder")
    tok.add_argument("--vocab-size", type=int, default=4096)
    _common(tok)
    pre = sub.add_parser("preprocess", help="JSONL / text -> megatron .bin/.idx")
    pre.add_argument("inputs", nargs="*", help="JSONL (.jsonl/.json) or text files, or globs")
    pre.add_argument("--stdlib", action="store_true", help="add Python's stdlib .py files")
    pre.add_argument("--tokenizer", required=True, help="tokenizer.json or its folder")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin / PREFIX.idx")
    pre.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    pre.add_argument("--no-progress", action="store_true")
    _common(pre)
    return top


def _say(text: str) -> None:
    print(f"mptk-data: {text}", flush=True)


def cmd_tokenizer(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.source:
        tok = tokenizer.load(args.source)
        tok.save(str(out / "tokenizer.json"))
        _say(f"imported {args.source}")
    else:
        start, paths = time.perf_counter(), preprocess.expand_inputs(args.train)
        texts = (text for text, _ in preprocess.iter_documents(paths, args.json_key))
        tok = tokenizer.train_bpe(texts, args.vocab_size, out / "tokenizer.json")
        _say(f"trained on {len(paths)} files in {time.perf_counter() - start:.1f}s")
    eod = preprocess.find_eod(tok, args.eod_token)
    _say(f"{out / 'tokenizer.json'}: vocab {tok.get_vocab_size()}, end-of-document id {eod}")


def _inputs(args) -> list[str]:
    inputs = list(args.inputs)
    if args.stdlib:
        inputs += [str(p) for p in corpus.stdlib_files()]
    if not inputs:
        raise ValueError("no inputs: give files or globs, or --stdlib")
    return inputs


def cmd_preprocess(args) -> None:
    tok = tokenizer.load(args.tokenizer)
    summary = preprocess.preprocess_files(
        _inputs(args), tok, args.output_prefix, json_key=args.json_key,
        eod_token=args.eod_token, workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty())
    _say(summary.line())


def main(argv: list[str] | None = None) -> int:
    from mptk.log.noise import quiet

    args = parser().parse_args(argv)
    quiet()
    try:
        {"tokenizer": cmd_tokenizer, "preprocess": cmd_preprocess}[args.command](args)
    except (OSError, ValueError) as err:
        print(f"mptk-data: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
