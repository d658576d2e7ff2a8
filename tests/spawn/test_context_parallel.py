"""Context parallelism proven by equality: cp=2 and cp=4 (alone, with tp=2 and with pp=2, at
ZeRO 0-2) give the per-step losses, grad norms and held-out loss of cp=1, with learned and
rotary positions. Several layouts run one after another in one 4-rank world (megatron's groups
re-made per layout), so the whole table costs one spawn. And the check can fail: with the
cp peers' gradients left unreduced (run last in the same world), cp=2 no longer equals cp=1."""

import numpy as np
import pytest
from harness import assert_steps_same, run_world, tiny_overrides, train_steps

pytestmark = pytest.mark.spawn

LAYOUTS = {
    "cp4-z0": ("parallel.cp=4", "zero=zero0"),
    "cp2-dp2-z1": ("parallel.cp=2", "zero=zero1"),
    "cp2-dp2-z2": ("parallel.cp=2", "zero=zero2"),
    "cp2-tp2-z0": ("parallel.cp=2", "parallel.tp=2", "zero=zero0"),
    "cp2-tp2-z2": ("parallel.cp=2", "parallel.tp=2", "zero=zero2"),
    "cp2-pp2-z0": ("parallel.cp=2", "parallel.pp=2", "zero=zero0"),
    "cp2-pp2-z1": ("parallel.cp=2", "parallel.pp=2", "zero=zero1"),
}
ROPE = {"cp2-dp2-z1-rope": ("parallel.cp=2", "zero=zero1"),
        "cp4-z0-rope": ("parallel.cp=4", "zero=zero0")}


def train_all(env, configs: dict, steps: int, broken=None) -> dict:
    """Per layout (in order, in these processes): per-step loss and grad norm, then eval;
    then, when given, the ``broken`` config without the cp gradient reduction."""
    from mptk.train.loop import one_eval, setup

    out = {}
    if broken is not None:
        configs = {**configs, "broken": broken}
    for name, cfg in configs.items():
        if name == "broken":
            unreduce_cp()
        w = setup(cfg, env)
        run = train_steps(w, steps)
        run["eval_loss"] = one_eval(w)["eval_loss"]
        out[name] = run
    return out


def unreduce_cp():
    """From now on DeepSpeed reduces over pure dp only (the cp peers' gradients not averaged)."""
    from megatron.core import parallel_state as ps

    from mptk.engine import deepspeed as ds
    from mptk.parallel.mpu import MegatronMpu

    MegatronMpu.get_data_parallel_group = lambda self: ps.get_data_parallel_group()
    MegatronMpu.get_data_parallel_rank = lambda self: ps.get_data_parallel_rank()
    MegatronMpu.get_data_parallel_world_size = lambda self: ps.get_data_parallel_world_size()
    config = ds.ds_config  # DeepSpeed then sees dp ranks only: its batch is the global one
    ds.ds_config = lambda c, layout: {**config(c, layout), "train_batch_size": c.train.global_batch_size}


def make(cache, folder, *overrides):
    """A 4-rank config; held-out micro-batches per rank 4/dp, so that every layout evaluates
    the same first 4 micro-batches of the valid split (the eval shards over dp)."""
    from mptk.config.load import compose

    cfg = compose(tiny_overrides(cache) + ["launcher.nproc_per_node=4", "parallel.tp=1",
                                           *overrides])
    p = cfg.parallel
    cfg.train.eval_batches = 4 // (4 // (p.tp * p.cp * p.pp))
    cfg.run_dir = str(folder / "run")
    return cfg


def assert_same(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert_steps_same(ref, got, rtol)
    np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """cp=1 (dp=4) first, then every layout, in one 4-rank world; rank 0's figures."""
    folder = tmp_path_factory.mktemp("cp")
    configs = {"cp1": make(data_cache, folder, "zero=zero0")}
    configs |= {k: make(data_cache, folder, *v) for k, v in LAYOUTS.items()}
    configs["cp1-rope"] = make(data_cache, folder, "zero=zero0", "model.position_embedding=rope")
    configs |= {k: make(data_cache, folder, *v, "model.position_embedding=rope")
                for k, v in ROPE.items()}
    broken = make(data_cache, folder, "parallel.cp=2", "zero=zero0")
    ranks = run_world(train_all, 4, configs, 3, broken, tmp=folder)
    for name in configs:  # every rank reports the same figures
        assert len({tuple(r[name]["loss"]) for r in ranks}) == 1, name
    return ranks[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_equals_cp1(runs, name):
    assert_same(runs["cp1"], runs[name])
    assert runs["cp1"]["loss"][0] != runs["cp1"]["loss"][-1]


@pytest.mark.parametrize("name", list(ROPE))
def test_context_parallel_with_rope_equals_cp1(runs, name):
    assert_same(runs["cp1-rope"], runs[name])


def test_without_the_cp_gradient_reduction_cp2_differs(runs):
    broken = runs["broken"]
    assert broken["loss"][0] == pytest.approx(runs["cp1"]["loss"][0], rel=1e-5)
    assert not np.allclose(broken["grad_norm"], runs["cp1"]["grad_norm"], rtol=1e-5, atol=0)
