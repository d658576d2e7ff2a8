"""Mixture-of-Experts' pure parts: the preflight lines for impossible expert layouts (naming
every factor), the accepted layouts and their derived ep, and the TransformerConfig fields the
model options become (the one translation)."""

import pytest

from mptk.config.checks import config_problems
from mptk.config.load import compose
from mptk.parallel.groups import megatron_sizes
from mptk.parallel.layout import derive


def problems(*overrides, world=4):
    cfg = compose(["model=gpt_moe_tiny", f"launcher.nproc_per_node={world}",
                   "train.micro_batch_size=4", "train.save_interval=-1", *overrides])
    return config_problems(cfg, world, False)


@pytest.mark.parametrize("overrides,line", [
    (("parallel.tp=1", "parallel.ep=3"), "parallel.ep: num_experts(8) % ep(3) != 0"),
    (("parallel.tp=2", "parallel.sp=true", "parallel.ep=4"),
     "parallel.ep: ep(4) does not divide dp(2)*cp(1) (dp = world/(tp(2)*cp(1)*pp(1)))"),
    (("parallel.tp=2", "model.seq_length=33"), "model.seq_length(33) is not divisible by parallel.tp(2)"),
    (("parallel.tp=1", "model.moe_topk=9"), "model.moe_topk(9) must be in 1..num_experts(8)"),
    (("parallel.tp=1", "model.bias=true"), "model.bias=true with model.num_experts"),
    (("parallel.tp=1", "parallel.ep=2", "zero=zero3"), "zero.stage(3) with parallel.ep(2) > 1"),
    (("parallel.tp=1", "parallel.ep=0"), "parallel.ep(0) must be >= 1"),
    (("parallel.tp=1", "model.moe_capacity_factor=0"), "model.moe_capacity_factor(0.0) must be > 0"),
    (("model=gpt_tiny", "parallel.tp=1", "parallel.ep=2"), "parallel.ep(2) needs model.num_experts > 0"),
])
def test_impossible_expert_layouts_get_one_line(overrides, line):
    found = problems(*overrides)
    assert any(p.startswith(line) for p in found), found


@pytest.mark.parametrize("overrides", [
    ("parallel.tp=1", "parallel.ep=4"), ("parallel.tp=2", "parallel.sp=true", "parallel.ep=2"),
    ("parallel.tp=1", "parallel.pp=2", "parallel.ep=2"), ("parallel.tp=1", "model.num_experts=0"),
])
def test_expert_layouts_are_accepted_and_derived(overrides):
    assert problems(*overrides) == []
    cfg = compose(["model=gpt_moe_tiny", "launcher.nproc_per_node=4", *overrides])
    assert derive(cfg, 4).ep == cfg.parallel.ep
    assert "ep=" in derive(cfg, 4).describe()


def test_moe_at_tp2_turns_sequence_parallelism_on():
    """megatron's MoE layer refuses tp > 1 without sp: the layout turns it on (dense: as asked)."""
    assert derive(compose(["model=gpt_moe_tiny", "parallel.tp=2"]), 4).sp
    assert not derive(compose(["model=gpt_tiny", "parallel.tp=2"]), 4).sp
    assert not derive(compose(["model=gpt_moe_tiny", "parallel.tp=1"]), 4).sp


def test_ep_maps_to_megatrons_name():
    assert megatron_sizes(2, 1, None, 1, 4)["expert_model_parallel_size"] == 4


def test_moe_options_become_transformer_config_fields():
    from mptk.config.schema import DType
    from mptk.models.megatron import transformer_config

    cfg = compose(["model=gpt_moe_tiny", "model.moe_capacity_factor=1.5",
                   "model.moe_shared_expert_hidden_size=32"])
    tc = transformer_config(cfg.model, 1, 1, DType.fp32)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (8, 2, 256)
    assert (tc.moe_expert_capacity_factor, tc.moe_shared_expert_intermediate_size) == (1.5, 32)
    assert tc.moe_token_dispatcher_type == "alltoall" and not tc.moe_grouped_gemm
    assert not (tc.moe_permute_fusion or tc.moe_router_fusion)
    dense = transformer_config(compose(["model=gpt_tiny"]).model, 1, 1, DType.fp32)
    assert dense.num_moe_experts is None
