"""Mixture-of-Experts with expert parallelism proven by equality: ep=2 and ep=4 (ZeRO 0-2,
with tp=2 + sequence parallelism, with pp=2, with cp=2 at pp=1 and pp=2) give the per-step
losses, grad norms (clipping active: ``optim.grad_clip`` below the norms), held-out loss, aux
loss and expert load of the one-process ep=1 run. The ep layouts run one after another in one
4-rank world (megatron's groups re-made per layout), so the table costs two spawns. And the
check can fail: with the expert gradients reduced over all of dp instead of the
expert-data-parallel group (run last in the same world), ep=2 no longer equals ep=1."""

import numpy as np
import pytest
from harness import assert_steps_same, run_world, tiny_overrides, train_steps

pytestmark = pytest.mark.spawn

MOE = ("model.num_experts=8", "model.moe_topk=2", "model.moe_ffn_hidden_size=64",
       "model.bias=false", "optim.grad_clip=0.5", "train.save_interval=-1")
LAYOUTS = {
    "ep2-dp4-z0": ("parallel.ep=2", "zero=zero0"),
    "ep4-dp4-z1": ("parallel.ep=4", "zero=zero1"),
    "ep2-dp4-z2": ("parallel.ep=2", "zero=zero2"),
    "ep2-tp2-sp-z0": ("parallel.ep=2", "parallel.tp=2", "parallel.sp=true", "zero=zero0"),
    "ep2-pp2-z1": ("parallel.ep=2", "parallel.pp=2", "zero=zero1"),
    "ep2-cp2-z1": ("parallel.ep=2", "parallel.cp=2", "zero=zero1"),
    "ep2-cp2-pp2-z0": ("parallel.ep=2", "parallel.cp=2", "parallel.pp=2", "zero=zero0"),
}


def train_all(env, configs: dict, steps: int, broken=None) -> dict:
    """Per layout (in order, in these processes): per-step loss and grad norm, the MoE figures
    of those steps, then eval; then, when given, the ``broken`` config with expert gradients
    reduced over the wrong group."""
    from mptk.train.loop import one_eval, setup

    out = {}
    if broken is not None:
        configs = {**configs, "broken": broken}
    for name, cfg in configs.items():
        if name == "broken":
            reduce_experts_over_dp()
        w = setup(cfg, env)
        run = train_steps(w, steps)
        run["moe"] = w.moe.read()
        run["eval_loss"] = one_eval(w)["eval_loss"]
        out[name] = run
    return out


def reduce_experts_over_dp():
    """From now on DeepSpeed is told the expert-data-parallel group is all of dp x cp: ranks
    holding different experts average their gradients."""
    from mptk.engine import experts
    from mptk.parallel import groups

    bridge = experts.bridge
    experts.bridge = lambda model, ep, ep_group, edp: bridge(model, ep, ep_group, groups.dp_cp_group())


def make(cache, folder, world, *overrides):
    """A config at ``world`` ranks; held-out micro-batches per rank 4/dp, so that every layout
    evaluates the same first 4 micro-batches of the valid split (the eval shards over dp)."""
    from mptk.config.load import compose

    cfg = compose(tiny_overrides(cache) + [f"launcher.nproc_per_node={world}", "parallel.tp=1",
                                           *MOE, *overrides])
    p = cfg.parallel
    cfg.train.eval_batches = 4 // (world // (p.tp * p.cp * p.pp))
    cfg.run_dir = str(folder / "run")
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """The one-process ep=1 run, then every ep layout in one 4-rank world; rank 0's figures."""
    folder = tmp_path_factory.mktemp("moe")
    ref = run_world(train_all, 1, {"ep1": make(data_cache, folder, 1, "zero=zero0")}, 3,
                    tmp=folder)[0]
    configs = {k: make(data_cache, folder, 4, *v) for k, v in LAYOUTS.items()}
    broken = make(data_cache, folder, 4, "parallel.ep=2", "zero=zero0")
    ranks = run_world(train_all, 4, configs, 3, broken, tmp=folder)
    for name in configs:  # every rank reports the same figures
        assert len({tuple(r[name]["loss"]) for r in ranks}) == 1, name
    return ref | ranks[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_equals_one_process(runs, name):
    ref, got = runs["ep1"], runs[name]
    assert_steps_same(ref, got, rtol=1e-5)
    np.testing.assert_allclose(got["eval_loss"], ref["eval_loss"], rtol=1e-5, atol=0)
    assert ref["loss"][0] != ref["loss"][-1]
    assert min(ref["grad_norm"]) > 0.5  # the clipping at 0.5 acted on every step


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_aux_loss_and_expert_load_equal_one_process(runs, name):
    ref, got = runs["ep1"]["moe"], runs[name]["moe"]
    assert ref["moe_aux_loss"] > 0 and ref["moe_load_min"] <= 1 <= ref["moe_load_max"]
    np.testing.assert_allclose([got[k] for k in sorted(ref)], [ref[k] for k in sorted(ref)],
                               rtol=1e-5, atol=0)


def test_experts_reduced_over_dp_differ(runs):
    """The wrong group shows at step 0 already: DeepSpeed's initial broadcast of expert weights
    over it copies rank 0's experts onto ranks holding other experts."""
    broken, ref = runs["broken"], runs["ep1"]
    assert not np.allclose(broken["loss"], ref["loss"], rtol=1e-5, atol=0)
    assert not np.allclose(broken["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)
