"""Speed options keep results equal to the plain path: same weights, same batches,
3 optimizer steps on real gloo ranks, loss and grad norm within fp32 tolerance (1e-5)."""

import numpy as np
import pytest
from harness import run_world, train_steps

pytestmark = pytest.mark.spawn

STEPS = 3
DP2 = ("parallel.tp=1", "launcher.nproc_per_node=2", "zero=zero1", "train.global_batch_size=4")


def losses(env, cfg, cast=True):
    """Losses and grad norms of STEPS steps through mptk's own setup/one_step; ``cast=False``
    skips the build-time dtype cast (what mptk did before it)."""
    from mptk.models import speed
    from mptk.train.loop import setup

    if not cast:
        speed.cast_params = lambda model, dtype: 0
    w = setup(cfg, env)
    out = train_steps(w, STEPS)
    import torch._dynamo.utils as dynamo_utils

    out["graphs"] = dynamo_utils.counters["stats"]["unique_graphs"]
    out["dtypes"] = sorted({str(p.dtype) for p in w.engine.module.parameters()})
    out["compiled"] = sum(getattr(m, "_compiled_call_impl", None) is not None
                          for m in w.engine.module.modules())
    out["kernels"] = {k: inner_optimizer(w.engine).defaults.get(k) for k in ("fused", "foreach")}
    return out


def inner_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def assert_equal(ref, got, rtol=1e-5):
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=rtol, atol=0)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=rtol * 10, atol=0)


@pytest.fixture(scope="module")
def plain_dp2(tiny_module, tmp_path_factory):
    """The plain path at dp=2, ZeRO-1 (reference for the options below)."""
    return run_world(losses, 2, tiny_module(*DP2), tmp=tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def tiny_module(data_cache, tmp_path_factory):
    from harness import tiny_overrides

    from mptk.config.load import compose

    def make(*overrides):
        cfg = compose(tiny_overrides(data_cache) + ["model.num_layers=3", *overrides])
        cfg.run_dir = str(tmp_path_factory.mktemp("run"))
        return cfg

    return make


def test_compile_equals_eager(plain_dp2, tiny_module, tmp_path):
    """Three layers, one compiled graph (no graph break, no recompile per layer)."""
    got = run_world(losses, 2, tiny_module(*DP2, "train.compile=true"), tmp=tmp_path)
    assert_equal(plain_dp2[0], got[0])
    assert got[0]["compiled"] == 3 and plain_dp2[0]["compiled"] == 0
    assert got[0]["graphs"] == 1


@pytest.mark.parametrize("option", ["optim.fused=true", "optim.foreach=true"])
def test_optimizer_kernels_equal_loop(plain_dp2, tiny_module, tmp_path, option):
    got = run_world(losses, 2, tiny_module(*DP2, option), tmp=tmp_path)
    assert_equal(plain_dp2[0], got[0])
    name = option.split(".")[1].split("=")[0]
    assert got[0]["kernels"][name] is True and plain_dp2[0]["kernels"][name] is None


def test_compile_with_tp2_and_zero3(tiny_module, tmp_path):
    """Compiled layers and loss with tensor-parallel collectives inside, under ZeRO-3's
    parameter hooks (dp=1 x tp=2), with the fused optimizer: equal to the plain run."""
    common = ("parallel.tp=2", "launcher.nproc_per_node=2", "zero=zero3",
              "train.global_batch_size=4")
    ref = run_world(losses, 2, tiny_module(*common), tmp=tmp_path)
    got = run_world(losses, 2, tiny_module(*common, "train.compile=true", "optim.fused=true",
                                           "train.compile_loss=true"), tmp=tmp_path)
    assert_equal(ref[0], got[0])
    assert got[0]["loss"] == got[1]["loss"]


def test_bf16_cast_at_build_keeps_results(tiny_module, tmp_path):
    """bf16 (dp=2, ZeRO-1): parameters cast when built give today's losses exactly (DeepSpeed
    made the same cast later), and every parameter is bf16 (megatron's norms were fp32)."""
    cfg = tiny_module(*DP2, "train.dtype=bf16")
    before = run_world(losses, 2, cfg, False, tmp=tmp_path)
    after = run_world(losses, 2, cfg, tmp=tmp_path)
    assert after[0]["loss"] == before[0]["loss"]
    assert after[0]["dtypes"] == ["torch.bfloat16"]
