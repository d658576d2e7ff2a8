"""mptk-plan on Mixture-of-Experts models: total vs active parameters against hand counts and
megatron-core's own, experts split over ep in memory and time, FLOPs from the active
parameters, the ep search; a dense model's plan is exactly what it was before experts."""

from __future__ import annotations

import dataclasses

import pytest

from mptk.cli import plan_report as report
from mptk.config.load import compose
from mptk.plan import Choice, choice_of, cost, memory, perf, plan
from mptk.plan import search as s
from mptk.plan.hardware import Cluster, gpu

TINY = ["model=gpt_moe_tiny"]
SMALL_GATED = ["model=gpt_moe_1b", "model.num_layers=2", "model.hidden_size=256",
               "model.num_attention_heads=4", "model.num_query_groups=2",
               "model.moe_ffn_hidden_size=512", "model.vocab_size=4096", "model.seq_length=128",
               "model.moe_shared_expert_hidden_size=384"]

MOE_1B = ["model=gpt_moe_1b", "train.dtype=bf16", "train.global_batch_size=48",
          "train.save_interval=-1"]  # checkpoints at ep > 1: docs/moe.md


def _shape(overrides: list[str]) -> cost.Shape:
    return cost.shape_of(compose(overrides).model)


# --------------------------------------------------------------------------- parameters


def test_moe_tiny_total_and_active_by_hand():
    """gpt_moe_tiny: 4 layers x 128, vocab 4096, 128 learned positions, tied, LayerNorm, no
    biases; each layer a router [8, 128] and 8 experts of fc1 [256, 128] + fc2 [128, 256]."""
    h, L, E, k, f = 128, 4, 8, 2, 256
    ends = 4096 * h + 128 * h + 2 * h  # token table, positions, final LayerNorm
    attention = 2 * 2 * h + 3 * h * h + h * h  # two LayerNorms, qkv, projection
    expert = 2 * f * h
    sh = _shape(TINY)
    assert isinstance(sh, cost.MoEShape)
    assert cost.total_params(sh) == ends + L * (attention + E * h + E * expert) == 2_906_368
    assert cost.active_params(sh) == ends + L * (attention + E * h + k * expert) == 1_333_504


def test_counts_equal_megatron():
    """megatron-core 0.16.1's own counts ("parameters on this rank", mptk-train): 2,906,368 for
    gpt_moe_tiny on one process; 940,288 per rank at tp2 x ep2 (docs/moe.md's run: half the
    vocabulary, qkv, projection and expert widths, 4 of 8 experts, router and norms whole);
    9,377,024 for a SwiGLU, RMSNorm, grouped-query, untied, shared-expert shape of gpt_moe_1b."""
    tiny = _shape(TINY)
    assert cost.numel(cost.stage_tensors(tiny, 1, 4, True, True)) == 2_906_368
    assert cost.numel(cost.stage_tensors(tiny, 2, 4, True, True, ep=2)) == 940_288
    assert cost.total_params(_shape(SMALL_GATED)) == 9_377_024


def test_gated_shared_expert_active_by_hand():
    sh = _shape(SMALL_GATED)
    h, f, shared = 256, 512, 384
    expert = 3 * f * h  # SwiGLU fc1 is two halves
    assert cost.total_params(sh) - cost.active_params(sh) == 2 * (8 - 2) * expert
    dense = cost.dense_layer_tensors(sh, 1)
    assert (2 * shared * h, True) in dense and (shared * h, True) in dense  # shared expert: dense
    assert sum(n for n, _ in cost.expert_tensors(sh, 1, 1)) == 8 * expert


def test_ep_halves_the_expert_weights_per_rank():
    sh = _shape(TINY)
    for tp in (1, 2):
        experts = [cost.numel(cost.stage_tensors(sh, tp, 4, True, True, 1, ep, "experts")) for ep in (1, 2, 4)]
        dense = [cost.numel(cost.stage_tensors(sh, tp, 4, True, True, 1, ep, "dense")) for ep in (1, 2, 4)]
        assert experts[0] == 2 * experts[1] == 4 * experts[2] == 4 * 8 * 2 * 256 * 128 // tp
        assert dense[0] == dense[1] == dense[2]


def test_expert_optimizer_states_partition_over_the_expert_data_parallel_group():
    """ZeRO-1 on dp 4 x ep 2: dense master and moments / 4, experts' / 2 (the ranks holding
    the same experts); ZeRO-0 keeps everything whole."""
    sh, tr = _shape(TINY), memory.Training(w=2)
    c = Choice(tp=1, pp=1, dp=4, zero=1, ep=2)
    dense = cost.stage_tensors(sh, 1, 4, True, True, part="dense")
    experts = cost.stage_tensors(sh, 1, 4, True, True, ep=2, part="experts")
    got = memory.rank_states(sh, c, tr, 4, True, True)
    want = [memory.model_states(dense, 4, 1, tr), memory.model_states(experts, 2, 1, tr)]
    assert got.as_dict() == {key: want[0].as_dict()[key] + want[1].as_dict()[key] for key in got.as_dict()}
    master_experts = 4 * cost.numel(experts) / 2
    assert want[1].master == pytest.approx(master_experts, abs=64)
    assert got.master > 4 * (cost.numel(dense) + cost.numel(experts)) / 4  # not all / dp
    zero0 = memory.rank_states(sh, dataclasses.replace(c, zero=0), tr, 4, True, True)
    assert zero0.params == 2 * cost.numel(cost.stage_tensors(sh, 1, 4, True, True, ep=2))


# --------------------------------------------------------------------------- FLOPs, activations, time


def test_flops_count_active_parameters():
    """Megatron's per-layer formula with the matmuls one token meets: attention, router and
    top-k experts (not all of them), so MFU is the active FLOPs'."""
    sh = _shape(TINY)
    h, seq, B = 128, 128, 8
    matmul = 3 * h * h + h * h + 8 * h + 2 * (2 * 256 * h)
    per_sample = 4 * (2 * seq * matmul + 4 * seq * seq * h) + 2 * seq * h * 4096
    assert cost.model_flops(sh, B) == 3 * B * per_sample
    all_experts = dataclasses.replace(sh, topk=8)
    assert cost.model_flops(all_experts, B) > 1.8 * cost.model_flops(sh, B)
    p = plan(compose([*TINY, "train.dtype=bf16"]), Cluster(1, 4, gpu("h100")))
    peak = 4 * gpu("h100").tflops * 1e12
    assert p.timing.mfu == pytest.approx(cost.model_flops(sh, p.training.global_batch) / p.timing.step / peak)


def test_moe_activations_one_expert_top1():
    """A one-expert top-1 MoE of width 4h keeps the dense MLP's bytes plus the dispatcher's two
    token copies (4sbh) and the fp32 router logits and probabilities (8sb)."""
    dense = cost.Shape("gpt", layers=1, hidden=64, heads=4, kv_heads=4, ffn=256, seq=32, vocab=128)
    moe = cost.MoEShape(**{f.name: getattr(dense, f.name) for f in dataclasses.fields(dense)},
                        experts=1, topk=1, expert_ffn=256)
    sb, h = 32 * 2, 64
    extra = cost.layer_activations(moe, 2, 1, False, "none", 2) - cost.layer_activations(dense, 2, 1, False, "none", 2)
    assert extra == pytest.approx(4 * sb * h + 8 * sb)
    assert cost.moe_activations(dense, 2, 1, False, "none") == 0.0
    assert cost.moe_activations(moe, 2, 1, False, "full") == 0.0  # only the layer input is kept
    top2 = dataclasses.replace(moe, experts=8, topk=2)
    assert cost.layer_activations(top2, 2, 1, False, "none", 2) > cost.layer_activations(moe, 2, 1, False, "none", 2)


def test_alltoall_volume_and_time():
    sh = _shape(TINY)
    assert cost.ep_alltoall_bytes(sh, 4, 1, False, 1, 2) == 0.0
    assert cost.ep_alltoall_bytes(sh, 4, 1, False, 2, 2) == 4 * 2 * 128 * 4 * 128 * 2 / 2
    assert cost.ep_alltoall_bytes(sh, 4, 2, True, 4, 2) == 4 * 2 * 64 * 4 * 128 * 2 * 3 / 4
    cfg, cluster = compose([*TINY, "train.dtype=bf16", "parallel.tp=1"]), Cluster(1, 4, gpu("h100"))
    one = plan(cfg, cluster)
    two = plan(cfg, cluster, dataclasses.replace(choice_of(cfg, 4), ep=2))
    assert one.timing.ep == 0.0
    c, m = two.choice, two.choice.grad_acc(two.training.global_batch)
    size = cost.ep_alltoall_bytes(two.shape, c.micro, 1, False, 2, 2)
    assert two.timing.ep == pytest.approx(4 * m * (size / cluster.gpu.nvlink + 4 * perf.LATENCY_NVLINK))
    assert ("expert-parallel all-to-all", two.timing.ep) in two.timing.rows()
    assert two.memory.params < one.memory.params


def test_verdict_names_total_and_active_parameters():
    cluster = Cluster(1, 8, gpu("h100"))
    moe = plan(compose(["model=gpt_moe_1b", "train.dtype=bf16"]), cluster)
    assert moe.verdict().startswith("parameters: 1,252,426,752 total, 421,954,560 active")
    assert "parameters:" not in plan(compose(["model=gpt_small"]), cluster).verdict()


# --------------------------------------------------------------------------- dense unchanged


@pytest.mark.parametrize("overrides, cluster, figures", [
    (["model=gpt_1p3b", "train.dtype=bf16", "parallel.tp=2", "parallel.pp=2",
      "train.global_batch_size=64", "train.recompute=full"], Cluster(2, 8, gpu("h100")),
     (7873441032.0, 0.5178003371412875, 0.1451520034271204, 328553472)),
    (["model=gpt_small", "zero.stage=3", "train.global_batch_size=32"], Cluster(1, 8, gpu("a100")),
     (6759723528.0, 0.08588861249216112, 0.13063531373024875, 62659584)),
    (["model=gpt_tiny"], Cluster(1, 4, gpu("l40s")),
     (2388941320.0, 0.0005778072657013205, 0.021175430757184387, 676864)),
])
@pytest.mark.parametrize("experts", [None, 0])
def test_dense_plans_are_unchanged(overrides, cluster, figures, experts):
    """The planner's figures from before MoE (memory, step time, MFU, parameters per rank),
    exactly, with model.num_experts null or 0."""
    p = plan(compose([*overrides, f"model.num_experts={'null' if experts is None else experts}"]), cluster)
    assert not isinstance(p.shape, cost.MoEShape)
    assert (p.memory.total(), p.timing.step, p.timing.mfu, p.memory.params) == figures


def test_dense_search_is_unchanged():
    r = s.search(compose(["model=gpt_small", "train.global_batch_size=64"]), Cluster(1, 8, gpu("h100")), top=3)
    assert r.evaluated == 2544
    assert [(p.timing.tokens_per_s, p.memory.total()) for p in r.ranked[:3]] == [
        (2840162.213714986, 4368341256.0), (2840162.213714986, 5206677768.0),
        (2840162.213714986, 6883350792.0)]
    assert {p.choice.ep for p in r.ranked} == {1}


# --------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def moe_search():
    cfg = compose(MOE_1B)
    return cfg, s.search(cfg, Cluster(1, 12, gpu("h100")), top=10)


def test_search_proposes_only_valid_ep(moe_search):
    """12 GPUs, 8 experts: dp x cp of 12, 6, 4, 3, 2 or 1; ep only among 1, 2, 4, 8 and dividing
    dp x cp, ZeRO <= 2 at ep > 1, sequence parallelism at tp > 1 (all as the preflight asks)."""
    cfg, result = moe_search
    choices = [p.choice for p in result.ranked + result.too_big]
    assert {c.ep for c in choices} >= {1, 2, 4}
    for c in choices:
        assert 8 % c.ep == 0 and c.replicas % c.ep == 0, c
        assert c.zero < 3 or c.ep == 1, c
        assert c.sp or c.tp == 1, c
    ep_options = s.ep_options(cost.shape_of(cfg.model), 6)
    assert ep_options == [1, 2]


def test_ep_layouts_pass_the_preflight(moe_search):
    cfg, result = moe_search
    with_ep = [p for p in result.ranked if p.choice.ep > 1][:3]
    assert with_ep
    for p in result.ranked[:3] + with_ep:
        assert report.explain(cfg, p.choice, 12) == [], p.choice
        again = compose([*MOE_1B, *s.overrides(cfg, p.choice)])
        assert choice_of(again, 12) == p.choice


def test_more_ep_needs_less_memory(moe_search):
    """Same layout otherwise (pp 1: one rank kind): each doubling of ep shrinks the weights."""
    _, result = moe_search
    by: dict[Choice, dict[int, memory.Memory]] = {}
    for p in result.ranked + result.too_big:
        if p.choice.pp == 1:
            by.setdefault(dataclasses.replace(p.choice, ep=1), {})[p.choice.ep] = p.memory
    rows = [m for m in by.values() if {1, 2, 4} <= set(m)]
    assert rows
    for m in rows:
        assert m[1].states.params > m[2].states.params > m[4].states.params
        assert m[1].activations == m[2].activations  # a balanced load keeps the same tokens


def test_perf_rows_without_ep_have_no_alltoall():
    p = plan(compose(["model=gpt_moe_1b", "train.dtype=bf16"]), Cluster(1, 8, gpu("h100")))
    assert all(name != "expert-parallel all-to-all" for name, _ in p.timing.rows())
    assert perf.ep_comm(p.shape, p.choice, p.training, p.cluster, 16, 1) == 0.0
