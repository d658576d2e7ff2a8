"""Pipeline stage balance: the cost model, explicit lists and megatron's layout rows."""

import pytest

from mptk.config.load import compose
from mptk.plan import partition
from mptk.plan.cost import numel, shape_of, stage_tensors


def model(*overrides):
    return compose(list(overrides)).model


def test_auto_moves_layers_off_the_last_stage_when_the_head_is_heavy():
    tiny = model()  # gpt_tiny: the output layer costs about two layers
    assert partition.stage_layers(tiny, 2, None, "auto") == [3, 1]
    m = shape_of(tiny)
    assert 1.5 < partition.head_flops(m) / partition.layer_flops(m) < 3


def test_auto_splits_evenly_when_the_ends_are_cheap():
    small_vocab = model("model.vocab_size=512", "model.num_layers=8")
    assert partition.stage_layers(small_vocab, 4, None, "auto") == [2, 2, 2, 2]


def test_auto_minimises_the_most_expensive_stage():
    big = model("model.vocab_size=50304", "model.num_layers=8")
    m, counts = shape_of(big), partition.stage_layers(big, 2, None, "auto")

    def cost(c):
        return [c[0] * partition.layer_flops(m), c[1] * partition.layer_flops(m)
                + partition.head_flops(m)]

    best = min(max(cost([k, 8 - k])) for k in range(1, 8))
    assert max(cost(counts)) == pytest.approx(best, rel=0.01)


@pytest.mark.parametrize("spec, message", [
    ([4], "has 1 entries but pp*vpp = 2"),
    ([1, 2], "sums to 3 but model.num_layers is 4"),
    ([4, 0], "every stage needs >= 1 layer"),
])
def test_explicit_lists_are_validated(spec, message):
    with pytest.raises(partition.PartitionError, match=message.replace("*", r"\*")):
        partition.stage_layers(model(), 2, None, spec)


def test_explicit_list_is_kept():
    assert partition.stage_layers(model(), 2, 2, [1, 1, 1, 1]) == [1, 1, 1, 1]


def test_megatron_layout_rows():
    assert partition.megatron_layout([2, 1]) == [["embedding", "decoder", "decoder"],
                                                 ["decoder", "loss"]]


def test_describe_accounts_for_every_parameter():
    m = model("model.vocab_size=512", "model.tie_embeddings=false")
    rows = partition.describe(m, 2, 2, "auto", micro_batch=2, tp=1, micro_batches=4)
    assert [r["rank"] for r in rows] == [0, 1, 0, 1] and [r["chunk"] for r in rows] == [0, 0, 1, 1]
    whole = numel(stage_tensors(shape_of(m), 1, m.num_layers, True, True))
    assert sum(r["params"] for r in rows) == whole
    assert "GFLOP/sample" in partition.format_rows(rows)
