"""Memory levers proven by equality: activation recomputation (selective, full) gives the
losses and grad norms of no recomputation; sequence parallelism at tp=2 and tp=4 gives those
of tp=1 (pp=1 and pp=2, ZeRO 0-3). And the check can fail: without the tp sum of the sequence-
parallel norm gradients, tp=2 with sp no longer equals tp=1."""

import numpy as np
import pytest
from harness import assert_steps_same as assert_same
from harness import run_world, train_steps
from test_pipeline import reference, run_pipe  # noqa: F401  (reference: the pp=1 fixture)

pytestmark = pytest.mark.spawn


def losses(env, cfg, steps, drop_tp_sum=False):
    """Per-step loss and grad norm; ``drop_tp_sum`` removes the sp norm-gradient reduction."""
    from mptk.engine import grads
    from mptk.train.loop import setup

    if drop_tp_sum:
        grads.sum_over_tp = lambda model, group, size: 0
    return train_steps(setup(cfg, env), steps)


def _module_run(folder, data_cache, *overrides):
    from harness import tiny_overrides

    from mptk.config.load import compose

    cfg = compose(tiny_overrides(data_cache) + ["launcher.nproc_per_node=4", *overrides])
    cfg.run_dir = str(folder / "run")
    return run_world(losses, 4, cfg, 3, tmp=folder)[0]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, data_cache):
    """tp=1 x dp=4 at ZeRO-0: what every sequence-parallel layout must reproduce."""
    return _module_run(tmp_path_factory.mktemp("tp1"), data_cache, "parallel.tp=1", "zero=zero0")


@pytest.fixture(scope="module")
def no_recompute(tmp_path_factory, data_cache):
    """tp=2 x dp=2 without recomputation, per ZeRO stage (computed once per stage)."""
    runs: dict = {}

    def get(zero):
        if zero not in runs:
            runs[zero] = _module_run(tmp_path_factory.mktemp(zero), data_cache, "parallel.tp=2",
                                     f"zero={zero}", "train.recompute=none")
        return runs[zero]
    return get


RECOMPUTE = {
    "selective": ("train.recompute=selective",),
    "full-uniform": ("train.recompute=full", "train.recompute_method=uniform", "train.recompute_layers=1"),
    "full-block": ("train.recompute=full", "train.recompute_method=block", "train.recompute_layers=1"),
}


@pytest.mark.parametrize("zero,how", [("zero0", "selective"), ("zero0", "full-uniform"),
                                      ("zero0", "full-block"), ("zero3", "selective"),
                                      ("zero3", "full-uniform")])
def test_recompute_equals_none_at_tp2_dp2(tiny, tmp_path, no_recompute, zero, how):
    ref = no_recompute(zero)
    got = run_world(losses, 4, tiny("parallel.tp=2", "launcher.nproc_per_node=4", f"zero={zero}",
                                    *RECOMPUTE[how]), 3, tmp=tmp_path)[0]
    assert_same(ref, got, rtol=1e-6)
    assert ref["loss"][0] != ref["loss"][-1]


def test_recompute_at_tp2_pp2_equals_none(tiny, reference, tmp_path):  # noqa: F811
    """Against no recomputation at the same tp2 x pp2 layout (1e-6), and that against pp=1 (1e-5)."""
    def at_tp2_pp2(how):
        return run_pipe(tiny, reference, tmp_path, 4, "parallel.tp=2", "parallel.pp=2", "zero=zero0",
                        f"train.recompute={how}")[0]

    none = at_tp2_pp2("none")
    assert_same(reference[0], none, rtol=1e-5)
    for how in ("selective", "full"):
        assert_same(none, at_tp2_pp2(how), rtol=1e-6)


@pytest.mark.parametrize("tp,zero", [(2, "zero0"), (4, "zero0"), (2, "zero1"), (2, "zero2"), (2, "zero3")])
def test_sequence_parallel_equals_tp1(tiny, tmp_path, tp1, tp, zero):
    got = run_world(losses, 4, tiny("launcher.nproc_per_node=4", f"zero={zero}", f"parallel.tp={tp}",
                                    "parallel.sp=true"), 3, tmp=tmp_path)
    assert_same(tp1, got[0], rtol=1e-5)
    assert len({tuple(r["loss"]) for r in got}) == 1  # every rank reports the same loss


def test_sequence_parallel_at_pp2_equals_pp1(tiny, reference, tmp_path):  # noqa: F811
    got = run_pipe(tiny, reference, tmp_path, 4, "parallel.tp=2", "parallel.pp=2", "zero=zero1",
                   "parallel.sp=true")
    assert_same(reference[0], got[0], rtol=1e-5)


def test_without_the_tp_sum_of_norm_gradients_sp_differs(tiny, tmp_path):
    common = ("launcher.nproc_per_node=2", "zero=zero0")
    ref = run_world(losses, 2, tiny(*common, "parallel.tp=1"), 3, tmp=tmp_path)[0]
    broken = run_world(losses, 2, tiny(*common, "parallel.tp=2", "parallel.sp=true"), 3, True,
                       tmp=tmp_path)[0]
    assert not np.allclose(broken["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)


def test_recompute_at_pp2_vpp2_equals_pp1(tiny, reference, tmp_path):  # noqa: F811
    """Interleaved stages checkpoint each of their chunks' layers."""
    got = run_pipe(tiny, reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2", "parallel.vpp=2",
                   "zero=zero0", "train.recompute=full", "train.recompute_layers=1")
    assert got[0]["stages"] == [1, 1, 1, 1]
    assert_same(reference[0], got[0], rtol=1e-6)


@pytest.mark.parametrize("extra", [("train.dtype=bf16", "zero=zero1"), ("train.compile=true", "zero=zero0")],
                         ids=["bf16", "compile"])
def test_recompute_equals_none_in_bf16_and_compiled(tiny, tmp_path, extra):
    """Recomputation reruns the same kernels on the same inputs with the RNG state of the forward
    (dropout on): in bf16 (ZeRO-1, where DeepSpeed's bf16 optimizer runs) and with compiled layers
    the losses are those without it."""
    common = ("launcher.nproc_per_node=2", "parallel.tp=2", "model.hidden_dropout=0.1",
              "model.attention_dropout=0.1", *extra)
    runs = {how: run_world(losses, 2, tiny(*common, f"train.recompute={how}"), 3, tmp=tmp_path)[0]
            for how in ("none", "selective", "full")}
    assert_same(runs["none"], runs["selective"], rtol=1e-6)
    assert_same(runs["none"], runs["full"], rtol=1e-6)
    assert runs["none"]["loss"][0] != runs["none"]["loss"][-1]
