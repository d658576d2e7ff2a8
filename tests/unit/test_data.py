"""Data pipeline: stdlib corpus, BPE tokenizer, the text cache (megatron .bin/.idx splits) and
the deterministic sampling every text source shares (megatron GPTDataset + the global order)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mptk.config.schema import DataConfig, DataSource
from mptk.data import blend, corpus, indexed, preprocess, tokenizer, tokens
from mptk.data.order import global_samples

MAX_CHARS = 300_000
VOCAB = 512


def small_cfg(cache_dir, **kw) -> DataConfig:
    kw.setdefault("max_chars", MAX_CHARS)
    return DataConfig(cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One small stdlib cache shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    folder = tokens.prepare(small_cfg(root), VOCAB, log=lines.append)
    return root, folder, lines


def temp_dirs(root: Path) -> list[Path]:
    return [p for p in Path(root).iterdir() if p.name.startswith(".tmp")]


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------


def test_stdlib_files_sorted_without_tests_or_site_packages():
    files = corpus.stdlib_files()
    root = corpus.stdlib_root()
    assert len(files) > 100
    rels = [f.relative_to(root).as_posix() for f in files]
    assert rels == sorted(rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    for rel in rels:
        parts = rel.split("/")[:-1]
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts), rel
    assert files == corpus.stdlib_files()


def test_read_documents_stops_at_max_chars():
    files = corpus.stdlib_files()
    docs = corpus.read_documents(files, 50_000)
    assert sum(len(d) for d in docs) == 50_000
    assert len(docs) < len(files)
    assert all(d.strip() for d in docs)


def test_files_from_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.txt", "b.txt", "sub/c.txt", "d.md"):
        (tmp_path / name).write_text(f"hello {name}\n")
    found = corpus.files_from_globs([str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")])
    assert [p.name for p in found] == ["a.txt", "b.txt", "c.txt"]
    with pytest.raises(ValueError, match="data.paths") as err:
        corpus.files_from_globs([str(tmp_path / "*.nothing")])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.paths"):
        corpus.files_from_globs([])


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


def test_tokenizer_round_trip_on_stdlib_text(tmp_path):
    files = corpus.stdlib_files()
    train = corpus.read_documents(files[:40], 200_000)
    unseen = corpus.read_documents(files[-20:], 100_000)
    path = tmp_path / "tokenizer.json"
    tok = tokenizer.train_bpe(train, VOCAB, path)
    assert tok.get_vocab_size() == VOCAB
    loaded = tokenizer.load(path)
    extra = "naïve ünïcode 😀 \t\r\n\x00 <|endoftext|> end"
    for text in unseen + [extra]:
        ids = loaded.encode(text).ids
        assert loaded.decode(ids) == text
    assert tokenizer.eod_id(loaded) not in loaded.encode(extra).ids
    assert loaded.id_to_token(tokenizer.eod_id(loaded)) == tokenizer.EOD


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer.train_bpe(["abc"], 100, tmp_path / "t.json")


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def test_prepare_layout_and_meta(cache):
    root, folder, lines = cache
    assert folder.parent == root
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "meta.json"} | {
        f"{split}{suffix}" for split in tokens.SPLITS
        for suffix in (".bin", ".idx", preprocess.META_SUFFIX)}
    meta = tokens.load_meta(folder)
    tok = tokens.load_tokenizer(folder)
    eod = tokenizer.eod_id(tok)
    assert meta["eod_id"] == eod and meta["vocab_size"] == VOCAB
    assert meta["chars"] == MAX_CHARS
    for split in tokens.SPLITS:
        arr = tokens.load_split(folder, split)
        info = meta["splits"][split]
        assert arr.dtype == np.uint16 and arr.ndim == 1
        assert arr.size == info["tokens"]
        assert int((arr == eod).sum()) == info["documents"] >= 1
        assert arr[-1] == eod and int(arr.max()) < VOCAB
    assert meta["documents"] == sum(meta["splits"][s]["documents"] for s in tokens.SPLITS)
    assert any("tokenizing" in line for line in lines)


def test_prepare_tokens_decode_to_source_text(cache):
    _, folder, _ = cache
    tok = tokens.load_tokenizer(folder)
    eod = tokenizer.eod_id(tok)
    train = np.asarray(tokens.load_split(folder, "train"))
    first_end = int(np.flatnonzero(train == eod)[0])
    first_doc = corpus.read_documents(corpus.stdlib_files(), MAX_CHARS)[0]
    assert tok.decode(train[:first_end].tolist()) == first_doc


def test_prepare_reuses_cache(cache):
    root, folder, _ = cache
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    lines: list[str] = []
    start = time.perf_counter()
    again = tokens.prepare(small_cfg(root), VOCAB, log=lines.append)
    assert again == folder
    assert time.perf_counter() - start < 1.0
    assert not any("tokenizing" in line for line in lines)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert tokens.cache_path(small_cfg(root), VOCAB) == folder


def test_cache_key_depends_on_settings(cache):
    root, folder, _ = cache
    files = corpus.stdlib_files()
    base = tokens.cache_key(small_cfg(root), files, VOCAB)
    assert base == folder.name
    assert tokens.cache_key(small_cfg(root), files, VOCAB * 2) != base
    assert tokens.cache_key(small_cfg(root, heldout_fraction=0.1), files, VOCAB) != base
    assert tokens.cache_key(small_cfg(root), files[:-1], VOCAB) != base


def test_no_temp_dirs_left(cache):
    root, _, _ = cache
    assert temp_dirs(root) == []


def test_failed_build_cleans_temp_dir(tmp_path, monkeypatch):
    def boom(folder, *args):
        (folder / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tokens, "_build", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tokens.prepare(small_cfg(tmp_path), VOCAB, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_publish_keeps_the_winner(tmp_path):
    target = tmp_path / "key"
    target.mkdir()
    (target / "meta.json").write_text("{}")
    loser = tmp_path / ".tmp-key-x"
    loser.mkdir()
    (loser / "meta.json").write_text('{"loser": 1}')
    assert tokens._publish(loser, target) == target
    assert not loser.exists()
    assert (target / "meta.json").read_text() == "{}"


def test_concurrent_prepare_agrees(tmp_path):
    cfg = small_cfg(tmp_path, max_chars=60_000)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        tokens.prepare(cfg, 300, log=lambda _: None))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert temp_dirs(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_prepare_from_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"doc{i}.txt").write_text(f"document number {i}\n" * 50)
    cfg = DataConfig(source=DataSource.files, paths=[str(src / "*.txt")],
                     cache_dir=str(tmp_path / "cache"), heldout_fraction=0.2)
    folder = tokens.prepare(cfg, 300, log=lambda _: None)
    meta = tokens.load_meta(folder)
    assert folder.name.startswith("files-")
    assert meta["splits"]["train"]["documents"] == 4
    assert meta["splits"]["heldout"]["documents"] == 1


def test_heldout_indices():
    assert tokens.heldout_indices(100, 0.02) == {49, 99}
    assert tokens.heldout_indices(10, 0.02) == {9}
    assert tokens.heldout_indices(10, 0.0) == {9}
    assert len(tokens.heldout_indices(1000, 0.1)) == 100
    with pytest.raises(ValueError):
        tokens.heldout_indices(1, 0.5)


def test_token_dtype():
    # uint16 holds ids 0..65535, i.e. every id of a vocabulary of up to 65536 entries
    assert preprocess.token_dtype(4096) == np.uint16
    assert preprocess.token_dtype(65535) == np.uint16
    assert preprocess.token_dtype(65536) == np.uint16
    assert preprocess.token_dtype(65537) == np.int32


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

SEQ = 8


def ramp(n=1001) -> np.ndarray:
    """Token i == i, so windows and shifts are easy to check."""
    return np.arange(n, dtype=np.int32)


def write_prefix(prefix: Path, docs: list[np.ndarray]) -> str:
    """``docs`` as a megatron indexed dataset (uint16), one sequence a document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def splits(train: str, valid: str, seq: int, seed: int, sizes: list[int], cache: Path):
    """megatron's train and valid GPTDatasets of two prefixes, as the text sources build them."""
    config = blend.gpt_config(None, None, seq, seed, str(cache),
                              blend.TokenizerInfo(vocab_size=65536, eod=0),
                              per_split=[blend.Blend((train,)), blend.Blend((valid,)), None])
    return blend.build(config, sizes, log=lambda _: None)[:2]


class Sampler:
    """A training split read the way :class:`indexed.IndexedData` reads it, with the
    rank's place passed per call (so one object serves every dp layout)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def batch(self, step, micro, mbs, grad_acc, dp_rank, dp_size):
        samples = global_samples(step, micro, mbs, grad_acc, dp_rank, dp_size)
        return indexed.collate(self.dataset, samples)

    def window_index(self, sample: int) -> int:
        """The (unshuffled) sample megatron reads as global sample ``sample``."""
        return int(self.dataset.shuffle_index[sample])


@pytest.fixture(scope="module")
def ramp_prefix(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("ramp")
    return write_prefix(root / "ramp", [ramp()]), root / "indices"


def ramp_sampler(ramp_prefix, seed: int, samples: int = 125) -> Sampler:
    """One epoch of the ramp (1000 // SEQ = 125 samples) unless ``samples`` asks for more."""
    prefix, cache = ramp_prefix
    return Sampler(splits(prefix, prefix, SEQ, seed, [samples, 8, 0], cache)[0])


def step_rows(sampler, step, mbs, grad_acc, dp) -> list[tuple]:
    rows = []
    for rank in range(dp):
        for micro in range(grad_acc):
            batch = sampler.batch(step, micro, mbs, grad_acc, rank, dp)
            rows += [tuple(r.tolist()) for r in batch["tokens"]]
    return sorted(rows)


def test_text_source_reads_its_cache_through_indexed_data(cache, monkeypatch):
    """The GPT recipe hands the loop megatron datasets of the cache's two splits."""
    from mptk.config import registry
    from mptk.config.load import compose
    from mptk.parallel import groups
    from mptk.parallel.layout import Layout

    monkeypatch.setattr(groups, "dp_rank", lambda: 0)  # no process groups here
    root, folder, _ = cache
    cfg = compose([f"data.cache_dir={root}", f"data.max_chars={MAX_CHARS}",
                   f"model.vocab_size={VOCAB}", "model.seq_length=32",
                   "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=3"])
    data = registry.get("gpt").data(cfg, Layout(tp=1, pp=1, dp=1, grad_acc=4, world=1),
                                    log=lambda _: None)
    assert isinstance(data, indexed.IndexedData) and data.test is None
    prefixes = [ds.dataset.path_prefix for ds in (data.train, data.valid)]
    assert prefixes == [tokens.split_prefix(folder, s) for s in tokens.SPLITS]
    assert data.batch(2, 3)["tokens"].shape == (2, 32) and len(data.eval_batches()) == 4
    assert {p.name for p in root.iterdir()} == {folder.name, "megatron-indices"}


def test_sampler_shapes_and_shifted_labels(cache, ramp_prefix, tmp_path):
    _, folder, _ = cache
    train = tokens.load_split(folder, "train")
    prefix = tokens.split_prefix(folder, "train")
    sampler = Sampler(splits(prefix, prefix, 32, 1, [64, 8, 0], tmp_path)[0])
    assert len(sampler.dataset.sample_index) - 1 == (len(train) - 1) // 32  # one epoch
    batch = sampler.batch(3, 1, 4, 2, 1, 2)
    assert batch["tokens"].shape == batch["labels"].shape == (4, 32)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    ramp_batch = ramp_sampler(ramp_prefix, seed=0).batch(0, 0, 4, 1, 0, 1)
    assert torch.equal(ramp_batch["labels"], ramp_batch["tokens"] + 1)
    assert (ramp_batch["tokens"][:, 0] % SEQ == 0).all()


def test_sampler_is_a_pure_function(ramp_prefix):
    a = ramp_sampler(ramp_prefix, seed=7)
    b = ramp_sampler(ramp_prefix, seed=7)
    for args in [(0, 0, 2, 2, 0, 2), (123, 1, 2, 2, 1, 2), (5, 0, 3, 1, 0, 1)]:
        x, y = a.batch(*args), b.batch(*args)
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    other_seed = ramp_sampler(ramp_prefix, seed=8).batch(0, 0, 4, 1, 0, 1)
    assert not torch.equal(other_seed["tokens"], a.batch(0, 0, 4, 1, 0, 1)["tokens"])


def test_sampler_differs_across_dp_ranks(ramp_prefix):
    sampler = ramp_sampler(ramp_prefix, seed=0)
    batches = [sampler.batch(2, 0, 4, 1, rank, 2)["tokens"] for rank in range(2)]
    starts = [set(b[:, 0].tolist()) for b in batches]
    assert starts[0].isdisjoint(starts[1])


def test_step_covers_same_samples_whatever_dp(ramp_prefix):
    sampler = ramp_sampler(ramp_prefix, seed=3)
    mbs, global_batch = 2, 8
    for step in (0, 1, 17):
        reference = step_rows(sampler, step, mbs, global_batch // mbs, 1)
        for dp in (2, 4):
            assert step_rows(sampler, step, mbs, global_batch // (mbs * dp), dp) == reference


def test_sampler_epochs_cover_every_window_once(ramp_prefix):
    """megatron shuffles a last, barely started epoch on its own: asking for one sample
    more than an epoch gives two epochs, each a permutation of its own n samples."""
    n = 125
    sampler = ramp_sampler(ramp_prefix, seed=0, samples=n + 1)
    epoch0 = [sampler.window_index(i) for i in range(n)]
    epoch1 = [sampler.window_index(n + i) - n for i in range(n)]  # epoch 1's samples: n..2n-1
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1


def test_sampler_rejects_short_arrays():
    short = {"splits": {"train": {"tokens": SEQ}, "heldout": {"tokens": 100}}}
    with pytest.raises(ValueError, match="too few"):
        indexed.check_lengths(short, SEQ)
    short["splits"].update(train={"tokens": 100}, heldout={"tokens": SEQ})
    with pytest.raises(ValueError, match="held-out split"):
        indexed.check_lengths(short, SEQ)


def test_eval_batches_deterministic_and_sharded(cache, ramp_prefix, tmp_path):
    _, folder, _ = cache
    heldout = tokens.split_prefix(folder, "heldout")
    valid = splits(heldout, heldout, 16, 0, [8, 6, 0], tmp_path)[1]
    one = indexed.fixed_batches(valid, 2, 3, 0, 1)
    again = indexed.fixed_batches(valid, 2, 3, 0, 1)
    assert len(one) == 3
    for x, y in zip(one, again):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    prefix, cache_dir = ramp_prefix
    ramp_valid = splits(prefix, prefix, SEQ, 0, [125, 125, 0], cache_dir)[1]
    window = [SEQ * int(w) for w in ramp_valid.shuffle_index]  # sample i's first token
    starts = [b["tokens"][:, 0] for b in indexed.fixed_batches(ramp_valid, 2, 3, 0, 1)]
    assert torch.cat(starts).tolist() == [window[i] for i in range(6)]
    sharded = [indexed.fixed_batches(ramp_valid, 2, 3, r, 2) for r in range(2)]
    firsts = sorted(int(b["tokens"][r, 0]) for s in sharded for b in s for r in range(2))
    assert firsts == sorted(window[i] for i in range(12))
    assert torch.equal(sharded[0][0]["tokens"][:, 0], torch.tensor([window[0], window[1]]))
    assert torch.equal(sharded[1][0]["tokens"][:, 0], torch.tensor([window[2], window[3]]))
