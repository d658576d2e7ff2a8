"""The ViT recipe's preflight at pp>1: the sequence sent between stages must match the image."""

import pytest

from mptk.config.load import compose
from mptk.train.preflight import PreflightError, preflight

PP2 = ("experiment=vit_digits", "parallel.pp=2", "zero=zero1")


def problems(*overrides: str) -> list[str]:
    try:
        preflight(compose(list(overrides)), 2, False)
    except PreflightError as err:
        return err.problems
    return []


def test_vit_pp2_passes_preflight():
    assert problems(*PP2) == []
    assert problems(*PP2, "parallel.vpp=2", "model.num_layers=4",
                    "train.micro_batch_size=16") == []


@pytest.mark.parametrize("overrides,fix", [
    (("model.seq_length=16",), "model.seq_length=17"),
    (("model.image_size=16",), "model.seq_length=65"),
    (("model.image_size=32", "model.patch_size=4", "model.seq_length=17"), "model.seq_length=65"),
])
def test_vit_pp2_seq_length_must_match_image(overrides, fix):
    lines = [line for line in problems(*PP2, *overrides) if "model.seq_length(" in line]
    assert len(lines) == 1 and lines[0].endswith(fix), lines


def test_vit_seq_length_not_read_at_pp1():
    assert problems("experiment=vit_digits", "model.seq_length=16") == []


def test_vit_bad_patch_reports_once_at_pp2():
    lines = problems(*PP2, "model.patch_size=3")
    assert any("model.patch_size(3) must divide" in line for line in lines)
    assert not any("model.seq_length(" in line for line in lines), lines


def test_interleaved_eval_batches_must_divide_by_pp():
    """megatron's interleaved schedule refuses M % pp != 0 at the first evaluation (found with
    the ViT at vpp=2, train.eval_batches=3); preflight says so before anything starts."""
    vpp = (*PP2, "parallel.vpp=2", "model.num_layers=4", "train.micro_batch_size=16")
    lines = problems(*vpp, "train.eval_batches=3")
    assert any("train.eval_batches(3) must be a multiple of pp(2)" in line for line in lines)
    assert problems(*vpp, "train.eval_batches=2") == []
    assert problems(*PP2, "train.eval_batches=3") == []  # 1F1B takes any count
