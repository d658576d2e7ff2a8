"""mptk-plan: memory, time and search against published formulas and figures, the preflight
and megatron-core's own parameter counts (CPU exactness of model states: tests/spawn)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mptk.cli import plan_report as report
from mptk.config.load import compose
from mptk.launch import measure
from mptk.plan import Choice, choice_of, cost, memory, perf, plan, predict_fits
from mptk.plan import search as s
from mptk.plan.hardware import GPUS, Cluster, from_device_name, gpu

GPT3_175B = ["model=gpt_1p3b", "model.num_layers=96", "model.hidden_size=12288",
             "model.num_attention_heads=96", "model.vocab_size=51200", "train.dtype=bf16"]


@pytest.fixture(scope="module")
def big():
    return compose(["model=gpt_1p3b", "train.dtype=bf16", "train.micro_batch_size=4",
                    "train.global_batch_size=512", "parallel.tp=1", "zero=zero1"])


# --------------------------------------------------------------------------- published figures


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_75b_on_64_gpus(stage, gb):
    """ZeRO paper (Rajbhandari et al. 2020) Fig. 1: 7.5B parameters, 64 GPUs, K = 12."""
    assert round(memory.zero_paper(7.5e9, 64, stage) / 1e9, 1) == gb
    tensors = Counter({(7_500_000_000, True): 1})
    states = memory.model_states(tensors, 64, stage, memory.Training(w=2))
    assert round(states.total() / 1e9, 1) == gb


def test_fp32_bytes_per_param():
    """fp32 AdamW: 4+4+8 at ZeRO-0; DeepSpeed clones an fp32 master at ZeRO>=1: 4+4+12/N."""
    t, tr = Counter({(1000, True): 1}), memory.Training(w=4)
    assert memory.model_states(t, 4, 0, tr).total() == 16 * 1000 + 4
    assert memory.model_states(t, 4, 1, tr).as_dict() == {
        "params": 4000, "grads": 4000, "master": 1000, "optim": 2000 + 4, "total": 11004}


def test_korthikanti_table2():
    s_, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s_ * b * h
    assert cost.korthikanti(s_, b, h, a) == sbh * (34 + 5 * a * s_ / h)
    assert cost.korthikanti(s_, b, h, a, t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s_ / (h * t)))
    assert cost.korthikanti(s_, b, h, a, t, sp=True) == pytest.approx(sbh / t * (34 + 5 * a * s_ / h))
    assert cost.korthikanti(s_, b, h, a, t, True, "selective") == pytest.approx(34 * sbh / t)
    assert cost.korthikanti(s_, b, h, a, t, True, "full") == 2 * sbh / t


def test_korthikanti_5x_for_530b():
    """Paper's headline: sequence parallel + selective recompute cut activations ~5x (530B,
    s 2048, h 20480, a 128, t 8) against tensor parallelism alone."""
    tp_only = cost.korthikanti(2048, 1, 20480, 128, 8)
    both = cost.korthikanti(2048, 1, 20480, 128, 8, True, "selective")
    assert 4.8 < tp_only / both < 5.1


def test_pipeline_memory_rules():
    assert memory.in_flight(pp=4, micro_batches=16) == 4  # 1F1B: first stage holds pp
    assert [memory.in_flight(4, 16, r) for r in range(4)] == [4, 3, 2, 1]
    assert memory.in_flight(8, 2) == 2  # never more than the step's micro-batches
    assert memory.interleave_factor(4, 2) == 1 + 3 / 8


def test_megatron_bubble_formulas():
    p, m = 8, 32
    assert perf.bubble_fraction(p, m) == (p - 1) / (m + p - 1)
    assert perf.bubble_overhead(p, m) == (p - 1) / m
    assert perf.bubble_overhead(p, m, v=4) == (p - 1) / (4 * m)
    ov = perf.bubble_overhead(p, m)  # share of the step = overhead / (1 + overhead)
    assert ov / (1 + ov) == pytest.approx(perf.bubble_fraction(p, m))


def test_megatron_flops_formula():
    sh = cost.Shape("gpt", layers=96, hidden=12288, heads=96, kv_heads=96, ffn=4 * 12288,
                      seq=2048, vocab=51200)
    B, s_, l, h, V = 1536, 2048, 96, 12288, 51200
    assert perf.model_flops(sh, B) == pytest.approx(cost.megatron_flops(B, s_, l, h, V), rel=1e-12)
    full = 96 * B * s_ * l * h * h * (1 + s_ / (6 * h) + V / (16 * l * h))  # Narayanan et al. 2021
    assert perf.hardware_flops(sh, B, "full") == pytest.approx(full, rel=1e-12)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("overrides, count", [
    (["model=gpt_tiny"], 1_334_016),
    (["model=gpt_small"], 124_475_904),  # GPT-2 small's 124,439,808 with vocab 50304
    (["experiment=vit_digits"], 102_282),
    (["model=gpt_tiny", "model.activation=swiglu", "model.normalization=RMSNorm",
      "model.num_query_groups=2", "model.position_embedding=rope", "model.tie_embeddings=false"],
     2_038_912),
    (["model=gpt_tiny", "model.bias=false"], 1_329_408),
    (["experiment=vit_digits", "model.bias=false"], 101_130),  # the class head keeps its bias
    (["model=gpt_tiny", "model.bias=false", "model.activation=swiglu", "model.normalization=RMSNorm",
      "model.num_query_groups=2", "model.position_embedding=rope", "model.tie_embeddings=false"],
     2_032_768),
])
def test_param_counts_equal_megatron(overrides, count):
    """Counts measured on megatron-core 0.16.1 models built by the recipes (sum of numel)."""
    assert cost.total_params(cost.shape_of(compose(overrides).model)) == count


@pytest.mark.parametrize("overrides, count", [
    (["model=gpt_tiny"], 676_864),
    (["model=gpt_tiny", "model.bias=false"], 674_048),
    (["experiment=vit_digits", "model.bias=false"], 51_978),
    (["model=gpt_tiny", "model.bias=false", "model.activation=swiglu", "model.normalization=RMSNorm",
      "model.num_query_groups=2", "model.position_embedding=rope", "model.tie_embeddings=false"],
     1_016_960),
])
def test_param_counts_at_tp2_equal_megatron(overrides, count):
    """Per-rank counts of the same megatron-core models built at tp 2 (tests/spawn builds
    them at bias=true: test_plan_measure.py)."""
    sh = cost.shape_of(compose(overrides).model)
    assert cost.numel(cost.stage_tensors(sh, 2, sh.layers, True, True)) == count


def test_bias_false_drops_the_linears_biases_by_hand():
    """``model.bias=false`` (megatron's ``add_bias_linear``) drops the qkv, projection, fc1
    and fc2 biases of every layer, and nothing else: the LayerNorms keep theirs. gpt_tiny: 4
    layers x 128, qkv 3h, fc1 4h; 1.3B: 24 x 2048. The memory follows the count."""
    per_layer = 3 * 128 + 128 + 4 * 128 + 128
    with_b, without = (cost.shape_of(compose(["model=gpt_tiny", f"model.bias={b}"]).model)
                       for b in ("true", "false"))
    assert cost.total_params(with_b) - cost.total_params(without) == 4 * per_layer == 4608
    assert cost.tensor_count(cost.stage_tensors(with_b, 1, 4, True, True)) - cost.tensor_count(
        cost.stage_tensors(without, 1, 4, True, True)) == 4 * 4
    no_bias = compose(["model=gpt_1p3b", "train.dtype=bf16", "train.micro_batch_size=4",
                       "train.global_batch_size=512", "parallel.tp=1", "zero=zero1",
                       "model.bias=false"])
    rows = dict(plan(no_bias, Cluster(4, 8, gpu("h100"))).memory.rows())
    assert rows["weights"] == 2 * (1_311_625_216 - 24 * (3 * 2048 + 2048 + 4 * 2048 + 2048))


def test_tp_ranks_split_matrices():
    sh = cost.shape_of(compose(["model=gpt_tiny"]).model)
    one, two = (cost.numel(cost.stage_tensors(sh, t, sh.layers, True, True)) for t in (1, 2))
    assert two < one < 2 * two  # replicated norms, biases and positions


def test_odd_model_exercises_padding():
    """The dist test's model: DeepSpeed's alignment padding is non-zero at dp 4."""
    sh = cost.Shape("gpt", layers=2, hidden=60, heads=4, kv_heads=4, ffn=240, seq=31, vocab=514)
    t, tr = cost.stage_tensors(sh, 2, 2, True, True), memory.Training(w=4)
    assert memory.model_states(t, 4, 1, tr).params > 4 * cost.numel(t)
    assert memory.model_states(t, 4, 3, tr).params > 4 * cost.numel(t) / 4


# --------------------------------------------------------------------------- plans


def test_plan_breakdown(big):
    p = plan(big, Cluster(4, 8, gpu("h100")))
    assert p.choice == Choice(tp=1, pp=1, dp=32, zero=1, micro=4)
    rows = dict(p.memory.rows())
    assert rows["weights"] == rows["gradients"] == 2 * 1_311_625_216
    assert p.fits and p.verdict().startswith("fits")
    assert 0 < p.timing.mfu < gpu("h100").efficiency
    assert p.timing.tokens_per_s == pytest.approx(512 * 2048 / p.timing.step)


def test_predict_fits_cpu_and_gpu(big):
    cpu = compose(["train.device=cpu"])
    layout = s.configured(cpu, choice_of(cpu, 4), 4)
    assert predict_fits(cpu, _layout(2, 1, 2), None) == (True, "CPU run: GPU memory not planned")
    assert layout.parallel.tp == cpu.parallel.tp
    ok, why = predict_fits(big, _layout(1, 1, 32), Cluster(4, 8, gpu("h100")))
    assert ok and "fits" in why
    huge = compose(GPT3_175B + ["zero=zero0", "parallel.tp=8", "train.global_batch_size=8",
                                "train.micro_batch_size=1"])
    ok, why = predict_fits(huge, _layout(8, 1, 1), Cluster(1, 8, gpu("h100")))
    assert not ok and why.startswith("does not fit")


def _layout(tp, pp, dp):
    from mptk.parallel.layout import Layout

    return Layout(tp=tp, pp=pp, dp=dp, grad_acc=1, world=tp * pp * dp)


def test_predict_fits_unknown_gpu(big):
    class Profile:
        nodes, gpus_per_node = 4, 8

    if torch.cuda.is_available():
        pytest.skip("a visible GPU is used as the GPU type")
    ok, why = predict_fits(big, _layout(1, 1, 32), Profile())
    assert ok and "GPU type unknown" in why


# --------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def found(big):
    return s.search(big, Cluster(64, 8, gpu("h100")), top=10)


def test_search_ranks_by_tokens_per_s(found):
    speeds = [p.timing.tokens_per_s for p in found.ranked]
    assert found.ranked and speeds == sorted(speeds, reverse=True)
    assert all(p.fits for p in found.ranked)


def test_top_layouts_pass_the_preflight(big, found):
    """Whatever the planner offers, the training preflight accepts (same world)."""
    for p in found.ranked[:10]:
        assert report.explain(big, p.choice, 512) == [], p.choice


def test_overrides_select_the_layout(big, found):
    best = found.ranked[0]
    extra = [o for o in s.overrides(big, best.choice) if not o.startswith("#")]
    again = compose(["model=gpt_1p3b", "train.dtype=bf16", "train.global_batch_size=512", *extra])
    assert choice_of(again, 512) == best.choice


def test_why_quotes_the_preflight():
    cfg = compose(["model=gpt_small", "train.global_batch_size=96", "train.micro_batch_size=1"])
    result = s.search(cfg, Cluster(1, 8, gpu("a100")))
    rows = {reason: lines for reason, _, _, lines in report.why(cfg, result, 8)}
    assert any("model.num_attention_heads(12)" in line
               for line in rows["tp does not divide the attention heads"])


def test_search_4096_gpus_runs():
    """The speed figure is printed by bench/plan_speed.py; here only that it completes."""
    cfg = compose(GPT3_175B + ["train.global_batch_size=1536"])
    result = s.search(cfg, Cluster(512, 8, gpu("h100")), s.Knobs(recompute=True, sp=True))
    assert result.ranked and result.evaluated > 1000


# --------------------------------------------------------------------------- hardware, CLI


def test_gpu_table():
    assert (gpu("H100").tflops, gpu("h200").tflops, gpu("a100").tflops) == (989.0, 989.0, 312.0)
    assert gpu("h200").memory > 139 * 2**30 > gpu("h100").memory > 79 * 2**30
    assert from_device_name("NVIDIA H100 80GB HBM3") is GPUS["h100"]
    with pytest.raises(KeyError, match="known"):
        gpu("v100")


def test_cli_split_overrides():
    from mptk.cli.plan import split_overrides

    keep, own = split_overrides(["model=gpt_small", "cluster.gpu=h100", "cluster.nodes=2"])
    assert own == {} and "cluster.gpu=h100" in keep  # ClusterConfig has the field: composed


def test_cli_exit_codes(capsys):
    from mptk.cli.plan import run

    args = ["model=gpt_1p3b", "train.dtype=bf16", "train.global_batch_size=64",
            "train.micro_batch_size=1", "cluster.gpu=h100", "--gpus-per-node", "8"]
    assert run(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True
    assert run(args + ["model.num_layers=200", "zero=zero0", "parallel.tp=1"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_cli_needs_gpu_type():
    from mptk.cli.plan import UsageError, run

    with pytest.raises(UsageError, match="GPU type unknown"):
        run(["--gpus-per-node", "8"])


def test_storage_bytes_counts_views_once():
    flat = torch.zeros(100)
    views = [flat[:40], flat[40:], torch.empty(3, device="meta"), torch.zeros(0)]
    assert measure.storage_bytes(views) == 400


# --------------------------------------------------------------------------- recompute, sp


def test_stage_activations_by_recompute_method():
    """Full recompute per model chunk: uniform keeps one layer input per group of
    recompute_layers layers, block keeps inputs on the first k layers and everything on the rest."""
    sh = cost.Shape("gpt", layers=5, hidden=1024, heads=16, kv_heads=16, ffn=4096, seq=2048,
                    vocab=51200, flash=False)
    args = (sh, 2, 2, True)
    inputs = cost.layer_activations(*args, "full", 2)
    kept = cost.layer_activations(*args, "none", 2)
    assert inputs == 2 * 2048 * 2 * 1024 / 2  # 2sbh/t
    assert cost.stage_activations(*args, "none", 2, 5) == 5 * kept
    assert cost.stage_activations(*args, "selective", 2, 5) == 5 * cost.layer_activations(
        *args, "selective", 2)
    assert cost.stage_activations(*args, "full", 2, 5) == 5 * inputs  # uniform, 1 layer a group
    assert cost.stage_activations(*args, "full", 2, 5, "uniform", 2) == 3 * inputs  # ceil(5/2)
    assert cost.stage_activations(*args, "full", 2, 5, "block", 2) == 2 * inputs + 3 * kept
    assert cost.stage_activations(*args, "full", 2, 5, "block", 9) == 5 * inputs
    assert cost.recompute_transient(*args, "full", 2, 5, "uniform", 2) == 2 * kept
    assert cost.recompute_transient(*args, "full", 2, 5, "block", 2) == kept
    assert cost.recompute_transient(*args, "selective", 2, 5) == 0
    assert [cost.recomputed_layers(5, r, m, 2) for r, m in
            (("full", "uniform"), ("full", "block"), ("selective", "uniform"), ("none", "block"))
            ] == [5, 2, 0, 0]


def test_plan_reads_recompute_and_sp(big):
    """train.recompute / recompute_method / recompute_layers and parallel.sp are config fields:
    the plan of a config uses them; block recompute sits between none and full in memory and
    between them in executed FLOPs (step time)."""
    base = ["model=gpt_1p3b", "train.dtype=bf16", "train.micro_batch_size=4",
            "train.global_batch_size=512", "parallel.tp=2", "parallel.pp=2", "zero=zero1"]
    cluster = Cluster(4, 8, gpu("h100"))
    plans = {name: plan(compose(base + extra), cluster) for name, extra in {
        "none": [], "sp": ["parallel.sp=true"],
        "full": ["train.recompute=full"],
        "block": ["train.recompute=full", "train.recompute_method=block", "train.recompute_layers=4"],
    }.items()}
    assert plans["sp"].choice.sp and plans["full"].choice.recompute == "full"
    assert plans["block"].training.recompute_method == "block"
    act = {k: p.memory.activations for k, p in plans.items()}
    assert act["sp"] < act["none"] and act["full"] < act["block"] < act["none"]
    step = {k: p.timing.compute for k, p in plans.items()}
    assert step["none"] < step["block"] < step["full"]


def test_search_varies_recompute_and_sp_by_default(big):
    knobs = s.knobs_of(big)
    assert knobs.recompute and knobs.sp
    tried = list(s._inner(Choice(tp=2, pp=1, dp=4), 8, knobs, choice_of(big, 8)))
    assert {(c.recompute, c.sp) for c in tried} == {(r, sp) for r in s.RECOMPUTE for sp in (0, 1)}
    assert {c.sp for c in s._inner(Choice(tp=1, pp=1, dp=8), 8, knobs, choice_of(big, 8))} == {False}


def test_overrides_set_recompute_and_sp(big):
    """Real overrides, only where the layout differs from the config; composing them back
    gives the layout."""
    c = Choice(tp=2, pp=1, dp=256, zero=1, micro=2, recompute="selective", sp=True)
    extra = s.overrides(big, c)
    assert "train.recompute=selective" in extra and "parallel.sp=true" in extra
    assert not any(o.startswith("#") for o in extra)
    again = compose(["model=gpt_1p3b", "train.dtype=bf16", "train.global_batch_size=512", *extra])
    assert choice_of(again, 512) == c
    assert not any("recompute" in o or "sp=" in o for o in s.overrides(again, c))
    back = s.overrides(again, Choice(tp=2, pp=1, dp=256, zero=1, micro=2))
    assert "train.recompute=none" in back and "parallel.sp=false" in back
    cfg = s.configured(big, c, 512)
    assert cfg.train.recompute.value == "selective" and cfg.parallel.sp is True


def test_dropout_masks_take_their_own_bytes():
    """16-bit with 1-byte masks is Korthikanti's formula; fp32 doubles every term but the masks
    (a GPU keeps bool masks), and on the CPU masks of the activation dtype add w - 1 per element."""
    from mptk.config.shape import Shape
    from mptk.plan import cost

    s = Shape(recipe="gpt", layers=2, hidden=64, heads=4, kv_heads=4, ffn=256, seq=32, vocab=512,
              flash=False)
    paper = cost.korthikanti(32, 2, 64, 4, 2)
    assert cost.layer_activations(s, 2, 2, False, "none", 2) == paper
    masks = cost.dropout_masks(s, 2, 2, False, "none")
    assert masks == 2 * 32 * 2 * 64 + 4 * 32 * 32 * 2 / 2
    assert cost.layer_activations(s, 2, 2, False, "none", 4) == 2 * paper - masks
    assert cost.layer_activations(s, 2, 2, False, "none", 4, mask=4) == 2 * paper + 2 * masks
    assert cost.dropout_masks(s, 2, 2, False, "full") == 0
