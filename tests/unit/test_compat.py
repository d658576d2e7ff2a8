"""The CPU compatibility layer: every megatron-core call site it relies on still exists, and
each redirect behaves like the CUDA original."""

import importlib
import inspect

import pytest
import torch

from mptk.compat import cpu


@pytest.mark.parametrize("patch", cpu.PATCHES, ids=lambda p: f"{p.module}:{p.needle[:30]}")
def test_call_site_still_in_megatron(patch):
    """Fails when a megatron-core upgrade moves or removes a redirected call site."""
    source = inspect.getsource(importlib.import_module(patch.module))
    assert patch.needle in source, f"{patch.module} no longer has {patch.needle!r}: {patch.why}"


def test_tracker_streams_differ_and_restore_default():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("a", 1)
    tracker.add("b", 2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.rand(3)
    with tracker.fork("b"):
        b1 = torch.rand(3)
    with tracker.fork("a"):
        a2 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    assert not torch.equal(a1, b1) and not torch.equal(a1, a2)  # streams advance separately
    torch.manual_seed(1)
    assert torch.equal(a1, torch.rand(3))  # stream 'a' is seed 1's sequence


def test_tracker_refuses_duplicates():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(Exception):  # noqa: B017 (megatron's tracker raises a bare Exception)
        tracker.add("a", 5)
    with pytest.raises(Exception):  # noqa: B017
        tracker.add("b", 1)


def test_cuda_to_cpu_mode_maps_devices():
    with cpu.CudaToCpuMode():
        made = torch.zeros(2, device="cuda")
        moved = torch.ones(2).cuda()
        to = torch.ones(2).to("cuda")
        dev = torch.empty(1, device=torch.device("cuda", 0))
    assert {made.device.type, moved.device.type, to.device.type, dev.device.type} == {"cpu"}


def test_megatron_seed_offsets_match_cuda_version():
    """Same seeds as megatron's model_parallel_cuda_manual_seed: dp=seed, tp=seed+2718+rank."""
    source = inspect.getsource(importlib.import_module("megatron.core.tensor_parallel.random"))
    assert "offset = seed + 2718" in source and "tensor_model_parallel_seed = offset + tp_rank" in source
