"""The logged model FLOPs of a Mixture-of-Experts GPT: Megatron-LM's
``num_floating_point_operations`` written out here, independently of mptk's per-layer count,
for shapes whose routed width (topk x expert ffn) is not the dense 4h."""

from __future__ import annotations

import pytest

from mptk.config.load import compose
from mptk.log import flops
from mptk.plan import cost


def megatron_lm_moe_flops(batch: int, s: int, layers: int, h: int, heads: int, groups: int,
                          vocab: int, experts: int, topk: int, expert_ffn: int, shared_ffn: int,
                          swiglu: bool) -> float:
    """Megatron-LM's formula for a GPT whose every MLP is MoE (no causal discount, as the
    dense 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) form), plus the router's [E, h] matmul:
    Megatron-LM leaves it out, mptk counts it with the other matmuls a token meets."""
    glu = 3 / 2 if swiglu else 1
    attention = (1 + groups / heads + s / h) * h  # qkv + projection + core, per h
    mlp = (expert_ffn * topk + shared_ffn) * glu
    logits = vocab / (2 * layers)
    megatron = 12 * batch * s * layers * h * (attention + mlp + logits)
    router = 3 * 2 * batch * s * layers * h * experts
    return megatron + router


@pytest.mark.parametrize("overrides", [
    ["model=gpt_moe_1b"],  # SwiGLU, 4 query groups, top-2 of 8 x 2816: topk x ffn = 5.5 h
    ["model=gpt_moe_1b", "model.moe_topk=1", "model.moe_shared_expert_hidden_size=1536",
     "model.num_experts=16"],
    ["model=gpt_moe_tiny"],  # GELU, MHA, top-2 of 8 x 256: topk x ffn = 4 h
    ["model=gpt_moe_tiny", "model.moe_topk=3", "model.moe_ffn_hidden_size=96"],
])
def test_logged_moe_flops_equal_megatron_lms(overrides):
    m = compose(overrides).model
    assert m.num_experts
    batch = 48
    want = megatron_lm_moe_flops(
        batch, m.seq_length, m.num_layers, m.hidden_size, m.num_attention_heads,
        m.num_query_groups or m.num_attention_heads, m.vocab_size, m.num_experts, m.moe_topk,
        m.moe_ffn_hidden_size, m.moe_shared_expert_hidden_size or 0,
        m.activation.value == "swiglu")
    assert flops.step_flops(m, batch) == pytest.approx(want, rel=1e-12)


def test_logged_flops_are_the_planners():
    """One owner of the formula: the run logs what the planner's MFU divides."""
    m = compose(["model=gpt_moe_1b"]).model
    assert flops.step_flops(m, 48) == cost.model_flops(cost.shape_of(m), 48)
    dense = 12 * 48 * 2048 * 16 * 1024 * ((1 + 4 / 16 + 2048 / 1024) * 1024 + 4 * 1024 * 3 / 2
                                          + 50304 / 32)
    assert flops.step_flops(m, 48) > 1.2 * dense  # not the figure of a dense 4h SwiGLU MLP
