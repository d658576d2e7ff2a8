"""Layout-invariant initialisation: one world of 4 ranks builds the model at tp1 (reference),
tp2 x pp2, pp2 vpp2, pp4, uneven stages [1,3] and tp4 (megatron's groups re-made between
layouts), and every rank's parameters equal the tp=1 model's, sliced by hand from megatron's
tp attributes (fused QKV: contiguous query groups; SwiGLU fc1: ``[gate_i; up_i]``)."""

import pytest
import torch
from harness import run_world
from test_pipeline import chunks, global_key

pytestmark = pytest.mark.spawn

MODEL = ("model.num_layers=4", "model.activation=swiglu", "zero=zero0",
         "launcher.nproc_per_node=4")
LAYOUTS = {
    "tp2_pp2": ("parallel.tp=2", "parallel.pp=2"),
    "pp2_vpp2": ("parallel.tp=1", "parallel.pp=2", "parallel.vpp=2"),
    "pp4": ("parallel.tp=1", "parallel.pp=4"),
    "pp2_uneven": ("parallel.tp=1", "parallel.pp=2", "parallel.layers_per_stage=[1,3]"),
    "tp4": ("parallel.tp=4",),
    "pp2_untied": ("parallel.tp=1", "parallel.pp=2", "model.tie_embeddings=false"),
}


def tp_slice(full: torch.Tensor, param: torch.Tensor, name: str) -> torch.Tensor:
    """This tp rank's part of the tp=1 tensor, from megatron's partition attributes."""
    from mptk.parallel import groups

    if not getattr(param, "tensor_model_parallel", False) or groups.tp_size() == 1:
        return full
    dim, rank, size = param.partition_dim, groups.tp_rank(), groups.tp_size()
    if "linear_fc1" in name:  # SwiGLU: [gate; up], each tp rank holds [gate_i; up_i]
        gate, up = full.chunk(2, dim)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim)
    return full.chunk(size, dim)[rank]


def build(cfg, world):
    from mptk.config import registry
    from mptk.train.loop import build_model
    from mptk.train.preflight import preflight

    layout = preflight(cfg, world, False)
    return layout, build_model(registry.get("gpt"), cfg, layout, torch.device("cpu"), "gloo")


def relayout(layout) -> None:
    """megatron's tp/pp groups for ``layout`` on the existing world."""
    from megatron.core import parallel_state as ps

    from mptk.parallel import groups

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(**groups.megatron_sizes(layout.tp, layout.pp, layout.vpp))
    groups.seed_model_parallel(7, torch.device("cpu"))


def compare_layouts(env, refs: dict, configs: dict):
    """Per layout: max |param - tp=1 slice| over this rank's parameters, and the layers seen."""
    from mptk.parallel import groups
    from mptk.train.preflight import preflight

    groups.init(env, 1, 1, torch.device("cpu"), "gloo", 7)
    full = {name: params(cfg, env.world_size) for name, cfg in refs.items()}
    out = {"seed8": params(reseeded(refs["tied"], 8), env.world_size), "seed7": full["tied"]}
    for name, (ref, cfg) in configs.items():
        relayout(preflight(cfg, env.world_size, False))
        layout, model = build(cfg, env.world_size)
        worst, layers = 0.0, []
        for chunk in chunks(model):
            layers += [layer.layer_number for layer in chunk.decoder.layers]
            for key, param in chunk.named_parameters():
                want = tp_slice(full[ref][global_key(chunk, key)], param, key)
                worst = max(worst, (param - want).abs().max().item())
        out[name] = (worst, layers, list(layout.stage_layers))
    return out


def params(cfg, world) -> dict:
    return {k: p.detach().clone() for k, p in build(cfg, world)[1].named_parameters()}


def reseeded(cfg, seed):
    import copy
    import dataclasses

    cfg = copy.deepcopy(cfg)
    cfg.train = dataclasses.replace(cfg.train, seed=seed)
    return cfg


@pytest.fixture(scope="module")
def layouts(data_cache, tmp_path_factory):
    """One world of 4: the tp=1 references (and seed 8), then every layout of LAYOUTS."""
    from harness import tiny_overrides

    from mptk.config.load import compose

    tmp = tmp_path_factory.mktemp("layouts")

    def tiny(*extra):
        cfg = compose(tiny_overrides(data_cache) + list(extra))
        cfg.run_dir = str(tmp / "run")
        return cfg

    refs = {"tied": tiny(*MODEL, "parallel.tp=1"),
            "untied": tiny(*MODEL, "parallel.tp=1", "model.tie_embeddings=false")}
    configs = {name: ("untied" if "untied" in name else "tied", tiny(*MODEL, *extra))
               for name, extra in LAYOUTS.items()}
    return run_world(compare_layouts, 4, refs, configs, tmp=tmp)


def test_every_layout_builds_the_one_process_weights(layouts):
    got = layouts
    for rank, result in enumerate(got):
        for name in LAYOUTS:
            worst = result[name][0]
            assert worst == 0.0, f"rank {rank} {name}: max |diff| {worst}"
    by_layout = {name: sorted({n for r in got for n in r[name][1]}) for name in LAYOUTS}
    assert all(layers == [1, 2, 3, 4] for layers in by_layout.values())  # every layer was built
    assert got[0]["pp2_uneven"][2] == [1, 3]
    assert got[0]["pp2_vpp2"][2] == [1, 1, 1, 1]


def test_weights_follow_the_seed_and_megatron_scheme(layouts):
    """Another seed draws other weights; the scheme's scales hold (0.02, 0.02/sqrt(2L), 1, 0)."""
    a, b = layouts[0]["seed7"], layouts[0]["seed8"]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert (a[qkv] - b[qkv]).abs().max() > 1e-3
    assert abs(a[qkv].std().item() - 0.02) < 2e-3
    proj = a["decoder.layers.0.self_attention.linear_proj.weight"]
    assert abs(proj.std().item() - 0.02 / 8 ** 0.5) < 1e-3  # 1/sqrt(2 * 4 layers)
    assert abs(a["decoder.layers.1.mlp.linear_fc2.weight"].std().item() - 0.02 / 8 ** 0.5) < 1e-3
    assert bool((a["decoder.layers.0.input_layernorm.weight"] == 1).all())
    assert bool((a["decoder.layers.0.mlp.linear_fc2.bias"] == 0).all())
    assert abs(a["embedding.word_embeddings.weight"].std().item() - 0.02) < 2e-3
    assert abs(a["embedding.position_embeddings.weight"].std().item() - 0.02) < 2e-3
