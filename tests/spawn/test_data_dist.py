"""Indexed data on real gloo ranks (tp=2 x dp=2), for data=indexed and for the default text
source (both read by the same megatron dataset code): the corpus is tokenized and its indices
built once (by rank 0, inside the loop's rank_zero_first), tp peers read the same batches, dp
ranks different ones, and one step's union equals a dp=1 run's step."""

import pytest
import torch
from harness import run_world

pytestmark = pytest.mark.spawn

OVERRIDES = ["data=indexed", "data.max_chars=300000", "data.split=[80,20,0]",
             "model.vocab_size=512", "model.seq_length=32", "parallel.tp=2",
             "launcher.nproc_per_node=4", "train.micro_batch_size=2",
             "train.global_batch_size=8", "train.steps=6", "train.eval_batches=2",
             "optim.warmup_steps=1"]


def rank_batches(env, cfg, steps):
    """This rank's place, its log lines and its batches of ``steps`` steps."""
    from mptk.config import registry
    from mptk.parallel import groups
    from mptk.train.loop import rank_zero_first
    from mptk.train.preflight import preflight

    layout = preflight(cfg, env.world_size, False)
    groups.init(env, layout.tp, layout.pp, torch.device("cpu"), "gloo", cfg.train.seed)
    lines = []
    data = rank_zero_first(lambda: registry.get("gpt").data(cfg, layout, log=lines.append))
    return {"tp": groups.tp_rank(), "dp": groups.dp_rank(), "lines": lines,
            "steps": [torch.cat([data.batch(s, m)["tokens"] for m in range(layout.grad_acc)])
                      for s in range(steps)],
            "eval": torch.cat([b["tokens"] for b in data.eval_batches()])}


def reference_steps(cfg, steps):
    """The same run's batches on one process (dp=1, grad_acc=4)."""
    from mptk.data.indexed import IndexedData
    from mptk.parallel.layout import Layout

    layout = Layout(tp=1, pp=1, dp=1, grad_acc=4, world=1)
    data = IndexedData.prepare(cfg, layout, cfg.model.vocab_size, log=lambda s: None, dp_rank=0)
    return [torch.cat([data.batch(s, m)["tokens"] for m in range(4)]) for s in range(steps)]


def rows(tensor):
    return sorted(map(tuple, tensor.tolist()))


@pytest.mark.parametrize("source,tokenized", [("indexed", "preprocessing"),
                                              ("stdlib", "tokenizing")])
def test_tp_peers_agree_dp_ranks_differ(tmp_path, source, tokenized):
    from mptk.config.load import compose

    overrides = OVERRIDES if source == "indexed" else [
        o for o in OVERRIDES if not o.startswith(("data=", "data.split"))]
    cfg = compose(overrides + [f"data.cache_dir={tmp_path / 'cache'}"])
    out = run_world(rank_batches, 4, cfg, 3, tmp=tmp_path)
    by_dp = {}
    for result in out:
        by_dp.setdefault(result["dp"], []).append(result)
    assert sorted(by_dp) == [0, 1] and all(len(v) == 2 for v in by_dp.values())
    for peers in by_dp.values():  # tp peers: the same batches
        assert {p["tp"] for p in peers} == {0, 1}
        for a, b in zip(peers[0]["steps"], peers[1]["steps"]):
            assert torch.equal(a, b)
        assert torch.equal(peers[0]["eval"], peers[1]["eval"])
    ref = reference_steps(cfg, 3)
    for step in range(3):
        dp0, dp1 = by_dp[0][0]["steps"][step], by_dp[1][0]["steps"][step]
        assert not torch.equal(dp0, dp1)
        assert rows(torch.cat([dp0, dp1])) == rows(ref[step])
    assert not torch.equal(by_dp[0][0]["eval"], by_dp[1][0]["eval"])
    built = [i for i, r in enumerate(out) if any("built" in x for x in r["lines"])]
    prepped = [i for i, r in enumerate(out) if any(tokenized in x for x in r["lines"])]
    assert built == [0] and prepped == [0]  # once, by rank 0; the others reused the caches
