"""Speed options without process groups: the dtype cast, the compiler check, and the
megatron name that per-layer compilation wraps."""

import importlib
import inspect

import pytest
import torch

from mptk.config.schema import DType
from mptk.models import speed


def test_cast_params_casts_fp32_parameters_not_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16), torch.nn.LayerNorm(4))
    model.register_buffer("inv_freq", torch.ones(2))
    assert speed.cast_params(model, DType.fp32) == 0
    assert speed.cast_params(model, DType.bf16) == 2  # LayerNorm weight and bias
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # as DeepSpeed leaves buffers


def test_no_cpu_compiler_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    problem = speed.inductor_problem(torch.device("cpu"))
    assert "C++ compiler" in problem and "g++" in problem
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="train.compile=true: .*train.compile=false"):
        speed.compile_layers(model)


def test_model_without_transformer_layers_is_refused(monkeypatch):
    monkeypatch.setattr(speed, "inductor_problem", lambda device: None)
    with pytest.raises(ValueError, match="no megatron TransformerLayer"):
        speed.compile_layers(torch.nn.Linear(2, 2))


def test_tp_group_lookup_is_still_the_warning_one():
    """The wrapped megatron function exists and still warns: if a megatron upgrade drops the
    warning, the wrapper can go; if it moves the function, this fails instead of compiling
    with graph breaks."""
    module = importlib.import_module(speed.TP_GROUP_LOOKUP[0])
    assert callable(getattr(module, speed.TP_GROUP_LOOKUP[1]))
    source = inspect.getsource(importlib.import_module("megatron.core.utils"))
    assert "def get_tensor_model_parallel_group_if_none" in source
    assert "Passing tp_group will be mandatory soon" in source
    assert "tp_group=None" in inspect.getsource(module.RowParallelLinear.forward)


def test_compile_loss_skips_models_without_a_language_loss(monkeypatch):
    monkeypatch.setattr(speed, "inductor_problem", lambda device: None)
    assert speed.compile_loss(torch.nn.Linear(2, 2)) is False
