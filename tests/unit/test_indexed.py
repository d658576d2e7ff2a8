"""megatron indexed datasets: preprocess round trip, blends, deterministic and resumable
sampling, the stdlib default and the ``mptk-data`` CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mptk.config.load import compose
from mptk.data import blend, indexed, preprocess, tokenizer
from mptk.data.order import Place
from mptk.parallel.layout import Layout

VOCAB = 512
SEQ = 16


def words(seed: int, n: int, alphabet: str) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list(alphabet), rng.integers(1, 7))) for _ in range(n))


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w") as out:
        for text in texts:
            out.write(json.dumps({key: text}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and two small datasets: A (letters a-m), B (letters n-z)."""
    root = tmp_path_factory.mktemp("indexed")
    texts_a = [words(i, 20 + i % 30, "abcdefghijklm") for i in range(300)]
    texts_b = [words(1000 + i, 20 + i % 30, "nopqrstuvwxyz") for i in range(300)]
    tok = tokenizer.train_bpe(texts_a + texts_b, VOCAB, root / "tokenizer.json")
    write_jsonl(root / "a.jsonl", texts_a)
    write_jsonl(root / "b.jsonl", texts_b)
    preprocess.preprocess_files([str(root / "a.jsonl")], tok, root / "a")
    preprocess.preprocess_files([str(root / "b.jsonl")], tok, root / "b", workers=2)
    return {"root": root, "tok": tok, "a": texts_a, "b": texts_b}


def run_cfg(root: Path, *overrides: str):
    return compose(["data=indexed", f"data.cache_dir={root / 'cache'}",
                    f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}",
                    "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=20",
                    "train.eval_batches=2", *overrides])


def make(cfg, dp=1, dp_rank=0, log=lambda s: None) -> indexed.IndexedData:
    grad_acc = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    layout = Layout(tp=1, pp=1, dp=dp, grad_acc=grad_acc, world=dp)
    return indexed.IndexedData.prepare(cfg, layout, cfg.model.vocab_size, log=log,
                                       dp_rank=dp_rank)


def step_rows(data: indexed.IndexedData, step: int) -> torch.Tensor:
    return torch.cat([data.batch(step, m)["tokens"] for m in range(data.place.grad_acc)])


# ---------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------


def test_preprocess_documents_round_trip(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds, tok = IndexedDataset(str(corpus["root"] / "a")), corpus["tok"]
    eod = tokenizer.eod_id(tok)
    assert len(ds) == len(corpus["a"]) and ds.document_indices.tolist() == list(range(301))
    for i in (0, 1, 150, 299):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        assert ids[:-1] == tok.encode(corpus["a"][i], add_special_tokens=False).ids
        assert tok.decode(ids[:-1]) == corpus["a"][i]
    meta = preprocess.read_meta(corpus["root"] / "a")
    assert meta["documents"] == 300 and meta["tokens"] == int(ds.sequence_lengths.sum())
    assert meta["eod_id"] == eod and meta["vocab_size"] == VOCAB


def test_workers_give_identical_files(corpus, tmp_path):
    root = corpus["root"]
    one = preprocess.preprocess_files([str(root / "b.jsonl")], corpus["tok"], tmp_path / "b1")
    assert one.documents == 300 and one.tokens > 0 and one.tokens_per_s > 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"b1{suffix}").read_bytes() == (root / f"b{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp*"))


def test_text_files_blank_docs_and_json_key(corpus, tmp_path):
    (tmp_path / "x.txt").write_text("first document\nstill first")
    (tmp_path / "y.md").write_text("   \n")
    write_jsonl(tmp_path / "z.jsonl", ["from json", "  "], key="body")
    summary = preprocess.preprocess_files([str(tmp_path / "*.txt"), str(tmp_path / "y.md"),
                                           str(tmp_path / "z.jsonl")], corpus["tok"],
                                          tmp_path / "out", json_key="body")
    assert (summary.documents, summary.skipped) == (2, 2)
    with pytest.raises(ValueError, match="'text'"):
        preprocess.preprocess_files([str(tmp_path / "z.jsonl")], corpus["tok"], tmp_path / "bad")
    assert not list(tmp_path.glob("bad*"))  # a failed run leaves no files behind
    with pytest.raises(FileNotFoundError, match="matched no files"):
        preprocess.expand_inputs([str(tmp_path / "*.nothing")])


# ---------------------------------------------------------------------------------------
# Blend parsing and checks
# ---------------------------------------------------------------------------------------


def test_blend_forms(corpus):
    a, b = str(corpus["root"] / "a"), str(corpus["root"] / "b")
    pairs = blend.parse([0.3, a, "0.7", b + ".bin"])
    assert pairs == blend.Blend((a, b), (0.3, 0.7))
    assert blend.parse([{"path": a, "weight": 0.3}, {"path": b, "weight": 0.7}]) == pairs
    assert blend.parse([a, b]) == blend.Blend((a, b), None)
    assert blend.parse([1, a]) == blend.Blend((a,), None)
    for bad in ([0.3, a, 0.7], [a, 0.3], [{"prefix": a}], [0, a, 1, b]):
        with pytest.raises(ValueError, match="data.blend"):
            blend.parse(bad)


def test_split_ranges_match_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for split in ("969,30,1", "98,2,0", "1", "8,1,1"):
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for n in (7, 300, 1001):
            want = [None if m is None else (round(m[0] * n), round(m[1] * n)) for m in matrix]
            assert blend.split_ranges(n, split) == want
    with pytest.raises(ValueError, match="data.split"):
        blend.split_vector("a,b")


def test_problems_and_checks(corpus, tmp_path):
    a = str(corpus["root"] / "a")
    assert blend.problems([], "98,2,0") == []
    assert blend.problems([a], "98,2,0") == []
    assert "missing files" in blend.problems([str(tmp_path / "nope")], "98,2,0")[0]
    assert "data.split" in blend.problems([a], "x")[0]
    assert "data.split" in blend.problems([a], [1, 2, 3, 4])[0]
    assert blend.problems([a], [98, 2, 0], VOCAB) == []
    assert "model.vocab_size" in blend.problems([a], [98, 2, 0], VOCAB - 1)[0]
    assert "none for the test split" in blend.problems([a], [969, 30, 1])[0]
    with pytest.raises(ValueError, match="none for the test split"):
        blend.check_documents(blend.Blend((a,)), "969,30,1")  # 300 docs: 0.1% rounds to 0
    with pytest.raises(ValueError, match="model.vocab_size"):
        blend.check_meta(blend.Blend((a,)), VOCAB - 1)


# ---------------------------------------------------------------------------------------
# Sampling: batches, blends, determinism, resume
# ---------------------------------------------------------------------------------------


def test_batches_are_windows_of_the_original_tokens(corpus):
    """Each row is seq+1 consecutive tokens of the documents (with EODs) in megatron's
    document order: the ids that were preprocessed, unchanged."""
    cfg = run_cfg(corpus["root"], f"data.blend=[{corpus['root'] / 'a'}]")
    data = make(cfg)
    ds, eod = data.train, tokenizer.eod_id(corpus["tok"])
    docs = [corpus["tok"].encode(t, add_special_tokens=False).ids + [eod] for t in corpus["a"]]
    stream = np.concatenate([docs[d] for d in ds.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in ds.document_index])])
    for step in range(3):
        batch = data.batch(step, 1)
        assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (2, SEQ)
        for row, g in enumerate(data.samples(step, 1)):
            doc, offset = ds.sample_index[ds.shuffle_index[g]]
            s = starts[doc] + offset
            assert batch["tokens"][row].tolist() == stream[s:s + SEQ].tolist()
            assert batch["labels"][row].tolist() == stream[s + 1:s + SEQ + 1].tolist()


def test_blend_weights_within_two_percent(corpus):
    root = corpus["root"]
    cfg = run_cfg(root, f"data.blend=[0.3,{root / 'a'},0.7,{root / 'b'}]",
                  "train.steps=1250")  # 10,000 samples
    data = make(cfg)
    samples = [g for s in range(1250) for m in range(data.place.grad_acc) for g in data.samples(s, m)]
    assert len(samples) == 10_000 == len(set(samples))
    counts = Counter(int(data.train[g]["dataset_id"]) for g in samples)
    assert abs(counts[0] / 10_000 - 0.3) < 0.02 and abs(counts[1] / 10_000 - 0.7) < 0.02
    a_ids = set(np.concatenate([data.train.datasets[0].dataset[i] for i in range(300)]).tolist())
    rows = data.batch(7, 0)["tokens"]
    for row, g in zip(rows, data.samples(7, 0)):  # a row's tokens come from its dataset
        assert (set(row.tolist()) <= a_ids) == (int(data.train[g]["dataset_id"]) == 0)


def test_sample_indices_match_place():
    for step, micro, mbs, grad_acc, rank, dp in [(0, 0, 2, 2, 0, 2), (5, 1, 2, 2, 1, 2),
                                                  (3, 3, 4, 4, 0, 1)]:
        place = Place(micro_batch_size=mbs, grad_acc=grad_acc, dp_rank=rank, dp_size=dp,
                      eval_batches=1)
        assert indexed.global_samples(step, micro, mbs, grad_acc, rank, dp) == \
            place.samples(step, micro)
    with pytest.raises(ValueError):
        indexed.global_samples(0, 2, 2, 2, 0, 1)


def test_dp_ranks_differ_and_union_is_independent_of_dp(corpus):
    cfg = run_cfg(corpus["root"], f"data.blend=[{corpus['root'] / 'a'}]")
    one = make(cfg, dp=1)
    two = [make(cfg, dp=2, dp_rank=r) for r in range(2)]
    for step in range(4):
        rank_rows = [step_rows(d, step) for d in two]
        assert not torch.equal(rank_rows[0], rank_rows[1])
        union = sorted(map(tuple, torch.cat(rank_rows).tolist()))
        assert union == sorted(map(tuple, step_rows(one, step).tolist()))
    evals = [d.eval_batches() for d in two]
    assert len(evals[0]) == 2 and not torch.equal(evals[0][0]["tokens"], evals[1][0]["tokens"])


def test_resume_mid_epoch_gives_the_same_samples(corpus):
    """A run rebuilt at step 10 (indices from the cache) reads what an uninterrupted run
    reads at steps 10..19; and the run is mid-epoch there."""
    cfg = run_cfg(corpus["root"], f"data.blend=[{corpus['root'] / 'b'}]")
    lines: list[str] = []
    full = make(cfg, log=lines.append)
    uninterrupted = [step_rows(full, s) for s in range(20)]
    lines.clear()
    resumed = make(cfg, log=lines.append)
    assert not any("built" in line for line in lines)  # indices reused, not rebuilt
    epoch = len(full.train.sample_index) - 1
    assert 10 * 8 < epoch  # the resume point lies inside the first epoch
    for step in range(10, 20):
        assert torch.equal(step_rows(resumed, step), uninterrupted[step])
    assert torch.equal(resumed.eval_batches()[1]["labels"], full.eval_batches()[1]["labels"])


def test_seed_changes_order(corpus):
    prefix = f"data.blend=[{corpus['root'] / 'a'}]"
    a = make(run_cfg(corpus["root"], prefix))
    b = make(run_cfg(corpus["root"], prefix, "train.seed=7"))
    assert not torch.equal(a.batch(0, 0)["tokens"], b.batch(0, 0)["tokens"])


def test_test_split(corpus):
    root = corpus["root"]
    data = make(run_cfg(root, f"data.blend=[{root / 'a'},{root / 'b'}]", "data.split=[8,1,1]"))
    assert data.test is not None and len(data.test_batches()) == 2
    no_test = make(run_cfg(root, f"data.blend=[{root / 'a'}]"))
    with pytest.raises(ValueError, match="test share"):
        no_test.test_batches()


# ---------------------------------------------------------------------------------------
# The stdlib default and the recipe
# ---------------------------------------------------------------------------------------


def test_stdlib_default_is_preprocessed_once(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cfg = run_cfg(tmp_path, "data.max_chars=200000", "data.split=[80,20,0]")
    lines: list[str] = []
    data = make(cfg, log=lines.append)
    assert any("preprocessing" in line and "stdlib" in line for line in lines), lines
    prefix = indexed.stdlib_prefix(cfg, VOCAB, log=lines.append)
    tok = tokenizer.load(Path(prefix).parent)
    ds = IndexedDataset(prefix)
    text = "".join(tok.decode(ds[i][:-1].tolist()) for i in range(len(ds)))
    assert len(text) == 200_000
    lines.clear()
    again = make(cfg, log=lines.append)
    assert lines == [] and torch.equal(again.batch(2, 1)["tokens"], data.batch(2, 1)["tokens"])


def test_recipe_dispatches_on_source(corpus, monkeypatch):
    from mptk.config import registry
    from mptk.parallel import groups

    monkeypatch.setattr(groups, "dp_rank", lambda: 0)  # no process groups here
    cfg = run_cfg(corpus["root"], f"data.blend=[{corpus['root'] / 'a'}]")
    layout = Layout(tp=1, pp=1, dp=1, grad_acc=4, world=1)
    data = registry.get("gpt").data(cfg, layout, log=lambda s: None)
    assert isinstance(data, indexed.IndexedData) and data.batch(0, 3)["tokens"].shape == (2, SEQ)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def test_cli_tokenizer_and_preprocess(corpus, tmp_path, capsys):
    from mptk.cli import data as cli

    root = corpus["root"]
    assert cli.main(["tokenizer", str(tmp_path / "tok"), "--train", str(root / "a.jsonl"),
                     "--vocab-size", "300"]) == 0
    assert "vocab 300" in capsys.readouterr().out
    corpus["tok"].model.save(str(tmp_path))  # GPT-2 style vocab.json + merges.txt
    assert cli.main(["tokenizer", str(tmp_path / "imp"), "--from", str(tmp_path)]) == 0
    assert cli.main(["preprocess", str(root / "a.jsonl"), "--tokenizer", str(root),
                     "--output-prefix", str(tmp_path / "out" / "a"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "300 documents" in out and "tokens/s" in out
    assert (tmp_path / "out" / "a.bin").read_bytes() == (root / "a.bin").read_bytes()
    assert cli.main(["preprocess", str(tmp_path / "none*"), "--tokenizer", str(root),
                     "--output-prefix", str(tmp_path / "x")]) == 2
    assert "matched no files" in capsys.readouterr().err
