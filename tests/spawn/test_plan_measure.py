"""Calibration on CPU: the planner's model-state bytes per rank equal what DeepSpeed's engine
actually holds (parameters, gradients, fp32 master, optimizer states; unique storages, padding
included) for ZeRO 0-3 x tp {1,2} x dp {1,2,4}. One spawned world per (tp, dp) builds an
engine per stage, one after another. The model has odd sizes (hidden 60, vocab 514, seq 31)
so DeepSpeed's alignment padding is exercised."""

import json
import os

import pytest
from harness import run_world

from mptk.config.load import compose
from mptk.launch.measure import measure_rank, write_rows

pytestmark = pytest.mark.spawn


def odd(tp: int, dp: int, *extra: str):
    """A tiny GPT with awkward sizes; one micro-batch per rank, no data files needed."""
    return compose(["train=smoke", "log=disabled", "model.num_layers=2", "model.hidden_size=60",
                    "model.num_attention_heads=4", "model.seq_length=31", "model.vocab_size=514",
                    "train.micro_batch_size=1", f"train.global_batch_size={dp}",
                    "train.eval_interval=0", "optim.warmup_steps=1", f"parallel.tp={tp}",
                    f"launcher.nproc_per_node={tp * dp}", *extra])


def check(rows_per_rank: list[list[dict]], tp: int, dp: int, tmp_path) -> None:
    rows = [r for ranks in rows_per_rank for r in ranks]
    assert sorted({r["zero"] for r in rows}) == [0, 1, 2, 3]
    assert len(rows) == 4 * tp * dp
    for r in rows:
        assert (r["tp"], r["dp"]) == (tp, dp)
        assert r["predicted"] == r["measured"], r
    write_rows(rows, str(tmp_path / "rows.jsonl"))
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(rows)
    json.loads((tmp_path / "rows.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("tp, dp", [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2)])
def test_model_states_exact(tp, dp, tmp_path):
    check(run_world(measure_rank, tp * dp, odd(tp, dp), tmp=tmp_path), tp, dp, tmp_path)


@pytest.mark.skipif(not os.environ.get("MPTK_PLAN_WORLD8"),
                    reason="tp2 x dp4 is 8 processes: ~3 min on 2 cores (set MPTK_PLAN_WORLD8=1)")
def test_model_states_exact_world8(tmp_path):
    check(run_world(measure_rank, 8, odd(2, 4), tmp=tmp_path), 2, 4, tmp_path)


def test_bf16_sgd_exact(tmp_path):
    """16-bit rules (fp32 master at ZeRO-0, 2-byte gradients; ZeRO-2's fp32 gradient copy)
    and SGD's momentum buffer."""
    cfg = odd(1, 2, "train.dtype=bf16", "optim=sgd")
    check(run_world(measure_rank, 2, cfg, tmp=tmp_path), 1, 2, tmp_path)


def rank_params(env, cfgs):
    """Parameters each recipe's model holds on this rank (tp=2)."""
    import torch

    from mptk.config import registry
    from mptk.parallel import groups
    from mptk.train.loop import build_model
    from mptk.train.preflight import preflight

    groups.init(env, 2, 1, torch.device("cpu"), "gloo", 1, None)
    counts = []
    for cfg in cfgs:
        layout = preflight(cfg, env.world_size, False)
        model = build_model(registry.get(cfg.model.recipe), cfg, layout, torch.device("cpu"), "gloo")
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts


def test_param_counts_at_tp2(tmp_path):
    """The planner's per-rank parameter count equals the megatron model's, for GPT (tied,
    learned positions), GPT (SwiGLU, RMSNorm, GQA, RoPE, untied) and ViT."""
    from mptk.plan.cost import numel, shape_of, stage_tensors

    common = ["parallel.tp=2", "launcher.nproc_per_node=2", "train.global_batch_size=64"]
    cfgs = [compose(["model=gpt_tiny", *common]),
            compose(["model=gpt_tiny", "model.activation=swiglu", "model.normalization=RMSNorm",
                     "model.num_query_groups=2", "model.position_embedding=rope",
                     "model.tie_embeddings=false", *common]),
            compose(["experiment=vit_digits", *common])]
    got = run_world(rank_params, 2, cfgs, tmp=tmp_path)
    for cfg, count in zip(cfgs, got[0]):
        sh = shape_of(cfg.model)
        assert numel(stage_tensors(sh, 2, sh.layers, True, True)) == count, cfg.model.recipe
    assert got[0] == got[1]
