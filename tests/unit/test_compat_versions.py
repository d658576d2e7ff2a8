"""A megatron-core without a call site the CPU layer redirects is one line naming it and the pin."""

import importlib
from pathlib import Path

import pytest

from mptk.compat import cpu


def test_the_installed_megatron_has_every_call_site():
    cpu.check_call_sites()


def test_a_missing_attribute_is_one_line_with_the_pin(monkeypatch):
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    monkeypatch.delattr(random, "_set_cuda_rng_state")
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.17.0")
    with pytest.raises(cpu.CompatError) as info:
        cpu.check_call_sites()
    assert str(info.value) == (
        "mptk.compat: megatron.core.tensor_parallel.random._set_cuda_rng_state not found in "
        "megatron-core 0.17.0 (tested: 0.16.1); pin megatron-core==0.16.1")


def test_a_moved_call_site_is_one_line(monkeypatch):
    moved = cpu.Patch("megatron.core.utils", "torch.cuda.no_such_call()", "a call site that moved")
    monkeypatch.setattr(cpu, "PATCHES", (*cpu.PATCHES, moved))
    with pytest.raises(cpu.CompatError, match=r"^mptk\.compat: megatron\.core\.utils: "
                       r"'torch\.cuda\.no_such_call\(\)' not found in megatron-core \S+ "
                       r"\(tested: 0\.16\.1\); pin megatron-core==0\.16\.1$"):
        cpu.check_call_sites()


def test_pyproject_bounds_match_the_tested_release():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"megatron-core>={cpu.TESTED_MEGATRON},<0.17"' in text
    assert '"deepspeed>=0.19.8,<0.20"' in text
