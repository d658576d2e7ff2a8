"""Preflight: every bad layout or setting is one line naming its factors and the fix."""

from __future__ import annotations

import pytest

from mptk.config import registry
from mptk.config.checks import clamp_warmup
from mptk.config.schema import (
    Backend,
    DataConfig,
    DataSource,
    Device,
    DType,
    OptimConfig,
    ParallelConfig,
    Recompute,
    RunConfig,
    TrainConfig,
    ZeroConfig,
)
from mptk.train import preflight as preflight_module
from mptk.train.preflight import Layout, PreflightError, preflight


def make(changes: dict | None = None) -> RunConfig:
    """A valid tp=2 x dp=2 GPT run, with ``{"group.field": value}`` changes applied."""
    model = registry.get("gpt").config(
        num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=128, vocab_size=4096
    )
    cfg = RunConfig(
        model=model,
        parallel=ParallelConfig(tp=2, pp=1),
        zero=ZeroConfig(stage=1),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10),
        data=DataConfig(),
        train=TrainConfig(steps=100, micro_batch_size=4, global_batch_size=8),
    )
    for dotted, value in (changes or {}).items():
        group, field = dotted.split(".")
        setattr(getattr(cfg, group), field, value)
    return cfg


# (changes, world, cuda, parts of the message)
BAD = {
    "unknown gpu": ({"cluster.gpu": "h900"}, 4, False,
                    ["cluster.gpu='h900' is not in the GPU table", "cluster.peak_tflops="]),
    "peak<=0": ({"cluster.peak_tflops": 0.0}, 4, False, ["cluster.peak_tflops(0.0) must be > 0"]),
    "tp<1": ({"parallel.tp": 0}, 4, False, ["parallel.tp(0) must be >= 1"]),
    "pp<1": ({"parallel.pp": 0}, 4, False, ["parallel.pp(0) must be >= 1"]),
    "world<1": ({}, 0, False, ["world(0) must be >= 1", "launcher.nproc_per_node"]),
    "tp*pp>world": ({"parallel.pp": 2}, 2, False, ["tp(2)*pp(2)=4 exceeds world(2)", "multiple of 4"]),
    "world%(tp*pp)": (
        {"parallel.pp": 2}, 6, False,
        ["parallel: tp(2)*pp(2)=4 does not divide world(6); choose tp*pp dividing the world size "
         "or change launcher.nproc_per_node"],
    ),
    "heads%tp": (
        {"parallel.tp": 4, "model.num_attention_heads": 6, "model.hidden_size": 96}, 8, False,
        ["model.num_attention_heads(6) is not divisible by parallel.tp(4)", "choose parallel.tp dividing 6"],
    ),
    "groups%tp": (
        {"model.num_query_groups": 1}, 4, False,
        ["model.num_query_groups(1) is not divisible by parallel.tp(2)"],
    ),
    "heads%groups": (
        {"parallel.tp": 1, "model.num_query_groups": 3}, 4, False,
        ["model.num_attention_heads(4) is not divisible by model.num_query_groups(3)"],
    ),
    "groups<1": ({"model.num_query_groups": 0}, 4, False, ["model.num_query_groups(0) must be >= 1"]),
    "layers<stages": (
        {"parallel.pp": 2, "parallel.vpp": 2, "model.num_layers": 3}, 4, False,
        ["model.num_layers(3) < pp(2)*vpp(2)=4", "every pipeline stage needs a layer"],
    ),
    "stage list length": (
        {"parallel.pp": 2, "parallel.layers_per_stage": [4]}, 4, False,
        ["parallel.layers_per_stage has 1 entries but pp*vpp = 2"],
    ),
    "stage list sum": (
        {"parallel.pp": 2, "parallel.layers_per_stage": [1, 2]}, 4, False,
        ["parallel.layers_per_stage=[1, 2] sums to 3 but model.num_layers is 4"],
    ),
    "empty stage": (
        {"parallel.pp": 2, "parallel.layers_per_stage": [4, 0]}, 4, False,
        ["parallel.layers_per_stage=[4, 0]: every stage needs >= 1 layer"],
    ),
    "save interval": (
        {"train.save_interval": -5}, 4, False, ["train.save_interval(-5) < -1"],
    ),
    "keep last": (
        {"train.keep_last": -1}, 4, False, ["train.keep_last(-1) < 0"],
    ),
    "vpp without pp": (
        {"parallel.vpp": 2}, 4, False, ["parallel.vpp(2) needs parallel.pp >= 2"],
    ),
    "interleaved micro-batches": (
        {"parallel.tp": 1, "parallel.pp": 2, "parallel.vpp": 2, "train.micro_batch_size": 1,
         "train.global_batch_size": 3}, 2, False,
        ["micro-batches(3)", "must be a multiple of pp(2)"],
    ),
    "hidden%heads": (
        {"model.hidden_size": 130}, 4, False,
        ["model.hidden_size(130) is not divisible by model.num_attention_heads(4)"],
    ),
    "global%(micro*dp)": (
        {"train.global_batch_size": 10}, 4, False,
        ["train.global_batch_size(10) != micro_batch_size(4) * grad_acc * dp(2): make it a multiple of 8"],
    ),
    "micro<1": ({"train.micro_batch_size": 0}, 4, False, ["train.micro_batch_size(0) must be >= 1"]),
    "zero stage 4": ({"zero.stage": 4}, 4, False, ["zero.stage(4) must be 0, 1, 2 or 3"]),
    "zero2+pp": (
        {"zero.stage": 2, "parallel.pp": 2}, 4, False,
        ["zero.stage(2) with parallel.pp(2)", "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism"],
    ),
    "zero3+pp": ({"zero.stage": 3, "parallel.pp": 2}, 4, False, ["zero.stage(3) with parallel.pp(2)"]),
    "offload w/o zero3": (
        {"zero.offload_params": True}, 4, False,
        ["zero.offload_params needs zero.stage=3 (got 1)", "zero=zero3_offload"],
    ),
    "fp16 on cpu": (
        {"train.dtype": DType.fp16}, 4, False,
        ["fp16 is not supported on CPU; use train.dtype=bf16 or fp32"],
    ),
    "fp16 device=cpu": (
        {"train.dtype": DType.fp16, "train.device": Device.cpu}, 4, True,
        ["fp16 is not supported on CPU"],
    ),
    "cuda w/o cuda": ({"train.device": Device.cuda}, 4, False, ["train.device=cuda but no CUDA device"]),
    "nccl on cpu": ({"launcher.backend": Backend.nccl}, 4, False, ["launcher.backend=nccl needs CUDA"]),
    "seq<1": ({"model.seq_length": 0}, 4, False, ["model.seq_length(0) must be >= 1"]),
    "vocab<2": ({"model.vocab_size": 1}, 4, False, ["model.vocab_size(1) must be >= 2"]),
    "vocab%tp": (
        {"model.vocab_size": 4097}, 4, False,
        ["model.vocab_size(4097) is not divisible by parallel.tp(2)", "4098"],
    ),
    "steps<1": ({"train.steps": 0}, 4, False, ["train.steps(0) must be >= 1"]),
    "lr<=0": ({"optim.lr": 0.0}, 4, False, ["optim.lr(0.0) must be > 0"]),
    "min_lr>lr": ({"optim.min_lr": 0.1}, 4, False, ["optim.min_lr(0.1) > optim.lr(0.001); set min_lr <= lr"]),
    "profile window inverted": (
        {"profile.start_step": 5, "profile.end_step": 2}, 4, False,
        ["profile.end_step(2) <= profile.start_step(5)", "set profile.end_step=6 or more"],
    ),
    "profile window empty": (
        {"profile.start_step": 3, "profile.end_step": 3}, 4, False, ["profile.end_step(3) <= "],
    ),
    "hang timeout<0": (
        {"debug.hang_timeout_s": -1.0}, 4, False,
        ["debug.hang_timeout_s(-1.0) < 0", "0 to turn the hang watchdog off"],
    ),
    "grad_clip<0": ({"optim.grad_clip": -1.0}, 4, False, ["optim.grad_clip(-1.0) must be >= 0"]),
    "log_interval<1": ({"train.log_interval": 0}, 4, False, ["train.log_interval(0) must be >= 1"]),
    "heldout=0": ({"data.heldout_fraction": 0.0}, 4, False, ["data.heldout_fraction(0.0) must be in (0, 1)"]),
    "heldout=1": ({"data.heldout_fraction": 1.0}, 4, False, ["data.heldout_fraction(1.0) must be in (0, 1)"]),
    "files w/o paths": ({"data.source": DataSource.files}, 4, False, ["data.paths is empty"]),
    "dropout>=1": ({"model.hidden_dropout": 1.0}, 4, False, ["model.hidden_dropout(1.0) must be in [0, 1)"]),
    "ffn<1": ({"model.ffn_hidden_size": 0}, 4, False, ["model.ffn_hidden_size(0) must be >= 1"]),
    "unknown recipe": (
        {"model.recipe": "nope"}, 4, False,
        ["model.recipe='nope' is not a registered recipe", "gpt"],
    ),
    "sp at tp=1": ({"parallel.sp": True, "parallel.tp": 1}, 4, False,
                   ["parallel.sp=true needs parallel.tp >= 2 (got tp(1))"]),
    "sp seq%tp": ({"parallel.sp": True, "model.seq_length": 127}, 4, False,
                  ["model.seq_length(127) is not divisible by parallel.tp(2)"]),
    "recompute_layers<1": ({"train.recompute": Recompute.full, "train.recompute_layers": 0}, 4, False,
                           ["train.recompute_layers(0) must be >= 1"]),
    "recompute_layers>layers": ({"train.recompute": Recompute.full, "train.recompute_layers": 5}, 4,
                                False, ["train.recompute_layers(5) > model.num_layers(4)"]),
}


@pytest.mark.parametrize("changes,world,cuda,parts", BAD.values(), ids=BAD.keys())
def test_bad_config_names_its_factors_and_fix(changes, world, cuda, parts):
    with pytest.raises(PreflightError) as info:
        preflight(make(changes), world_size=world, cuda_available=cuda)
    lines = str(info.value).splitlines()
    assert lines == info.value.problems
    for part in parts:
        assert any(part in line for line in lines), f"{part!r} not in {lines}"


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning():
    cfg = make({"optim.warmup_steps": 200})
    note = clamp_warmup(cfg)
    assert note is not None and "optim.warmup_steps(200) > train.steps(100)" in note
    assert "clamped to 100" in note
    assert cfg.optim.warmup_steps == 100
    assert clamp_warmup(cfg) is None
    assert preflight(cfg, world_size=4, cuda_available=False).dp == 2


def test_a_short_warmup_is_left_alone_and_profiling_off_is_fine():
    cfg = make({"optim.warmup_steps": 100, "profile.start_step": -1, "profile.end_step": -1,
                "debug.hang_timeout_s": 0.0})
    assert clamp_warmup(cfg) is None and cfg.optim.warmup_steps == 100
    assert preflight(cfg, world_size=4, cuda_available=False).dp == 2


def test_every_problem_is_reported_at_once():
    changes = {"parallel.tp": 3, "train.steps": 0, "optim.lr": -1.0, "zero.stage": 7}
    with pytest.raises(PreflightError) as info:
        preflight(make(changes), world_size=4, cuda_available=False)
    text = str(info.value)
    for part in ["does not divide world(4)", "train.steps(0)", "optim.lr(-1.0)", "zero.stage(7)"]:
        assert part in text
    assert len(info.value.problems) >= 4


@pytest.mark.parametrize(
    "changes,world,expected",
    [
        ({}, 4, Layout(tp=2, pp=1, dp=2, grad_acc=1, world=4)),
        ({"parallel.pp": 2, "train.global_batch_size": 16, "train.micro_batch_size": 2}, 8,
         Layout(tp=2, pp=2, dp=2, grad_acc=4, world=8, stage_layers=(3, 1))),  # head ~ 2 layers
        ({"parallel.pp": 2, "parallel.layers_per_stage": [3, 1], "parallel.tp": 1}, 2,
         Layout(tp=1, pp=2, dp=1, grad_acc=2, world=2, stage_layers=(3, 1))),
        ({"parallel.tp": 1}, 1, Layout(tp=1, pp=1, dp=1, grad_acc=2, world=1)),
        ({"parallel.tp": 4, "zero.stage": 3, "zero.offload_params": True}, 8,
         Layout(tp=4, pp=1, dp=2, grad_acc=1, world=8)),
        ({"parallel.sp": True, "train.recompute": Recompute.selective}, 4,
         Layout(tp=2, pp=1, dp=2, grad_acc=1, world=4, sp=True)),
    ],
)
def test_good_config_returns_its_layout(changes, world, expected):
    assert preflight(make(changes), world_size=world, cuda_available=False) == expected


def test_fp16_and_cuda_pass_with_a_gpu():
    layout = preflight(make({"train.dtype": DType.fp16, "train.device": Device.cuda}), 4, True)
    assert layout.dp == 2


def test_layout_is_frozen():
    layout = Layout(tp=1, pp=1, dp=1, grad_acc=1, world=1)
    with pytest.raises(AttributeError):
        layout.dp = 2


def test_recipe_checks_are_included(monkeypatch):
    recipe = registry.Recipe(
        name="stub", config=type(make().model), build=None, loss=None, data=None,
        checks=lambda cfg: [f"model.stub: bad ({cfg.parallel.tp})"],
    )
    monkeypatch.setattr(preflight_module.registry, "get", lambda name: recipe)
    with pytest.raises(PreflightError, match=r"model\.stub: bad \(2\)"):
        preflight(make(), world_size=4, cuda_available=False)


def test_a_crashing_recipe_check_is_one_line(monkeypatch):
    recipe = registry.Recipe(
        name="stub", config=type(make().model), build=None, loss=None, data=None,
        checks=lambda cfg: [1 // 0],
    )
    monkeypatch.setattr(preflight_module.registry, "get", lambda name: recipe)
    with pytest.raises(PreflightError, match="model.recipe=stub: its checks failed"):
        preflight(make(), world_size=4, cuda_available=False)


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(PreflightError) as info:
        preflight(make({"train.compile": True}), world_size=4, cuda_available=False)
    assert info.value.problems == [p for p in info.value.problems if "train.compile:" in p]
    assert "C++ compiler" in info.value.problems[0] and "train.compile=false" in info.value.problems[0]
    monkeypatch.undo()
    assert preflight(make({"train.compile": True}), world_size=4, cuda_available=False)
