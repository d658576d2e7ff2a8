"""The ViT recipe under real gloo process groups: tp=2 reproduces tp=1 on the same weights,
and ZeRO-2 at dp=2 reproduces ZeRO-0 (losses, gradient norms and held-out metrics)."""

import numpy as np
import pytest
import torch
from harness import assert_same, run_world

from mptk.config.load import compose

pytestmark = pytest.mark.spawn

STEPS = 3


@pytest.fixture
def vit(tmp_path):
    """The vit_digits experiment, shortened for several spawned runs per test."""

    def make(*overrides: str):
        cfg = compose(["experiment=vit_digits", "log=disabled", "train.steps=3",
                       "train.micro_batch_size=16", "train.global_batch_size=32",
                       "train.eval_interval=0", "train.save_interval=-1", "optim.warmup_steps=1",
                       *overrides])
        cfg.run_dir = str(tmp_path / "run")
        return cfg

    return make


def full_weights(model) -> dict:
    """Every parameter as the whole tensor (tp shards gathered along their partition dim)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in model.named_parameters():
        value = param.detach().clone()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts, dim=param.partition_dim)
        out[name] = value.numpy()
    return out


def train_and_eval(env, cfg):
    """Initial full weights, ``STEPS`` losses and grad norms, then held-out metrics."""
    from mptk.train.loop import setup
    from mptk.train.step import evaluate, train_step

    w = setup(cfg, env)
    out = {"weights": full_weights(w.engine.module), "loss": [], "grad_norm": []}
    for step in range(STEPS):
        loss, norm = train_step(w.engine, w.recipe, w.data, step, w.layout.grad_acc, w.device)
        out["loss"].append(loss)
        out["grad_norm"].append(norm)
    out["eval"] = evaluate(w.engine, w.recipe, w.data, w.device)
    return out


def test_vit_tp2_equals_tp1(vit, tmp_path):
    ref = run_world(train_and_eval, 1, vit("parallel.tp=1", "launcher.nproc_per_node=1",
                                           "zero=zero0"), tmp=tmp_path)[0]
    tp2 = run_world(train_and_eval, 2, vit("parallel.tp=2", "launcher.nproc_per_node=2",
                                           "zero=zero0"), tmp=tmp_path)
    assert tp2[0]["weights"].keys() == ref["weights"].keys()
    for name, value in ref["weights"].items():  # same starting weights, gathered over tp
        np.testing.assert_array_equal(tp2[0]["weights"][name], value, err_msg=name)
    assert tp2[0]["loss"] == tp2[1]["loss"]  # every tp rank agrees
    assert_same(ref, tp2[0])
    assert ref["loss"][0] != ref["loss"][-1]  # training moved the weights


def test_vit_zero2_equals_zero0_at_dp2(vit, tmp_path):
    common = ("parallel.tp=1", "launcher.nproc_per_node=2")
    ref = run_world(train_and_eval, 2, vit(*common, "zero=zero0"), tmp=tmp_path)
    got = run_world(train_and_eval, 2, vit(*common, "zero=zero2"), tmp=tmp_path)
    assert_same(ref[0], got[0])
    assert got[0]["eval"] == got[1]["eval"]  # held-out metrics are dp-reduced


def bidirectional_logits(env, cfg):
    """Mask types, and whether the class token sees the last patch, for sdpa and local."""
    import dataclasses

    from megatron.core.transformer.enums import AttnMaskType

    from mptk.config.registry import ModelContext, get
    from mptk.config.schema import AttentionImpl
    from mptk.parallel import groups

    groups.init(env, 1, 1, torch.device("cpu"), "gloo", cfg.train.seed)
    recipe, out = get("vit"), {}
    images = torch.rand(2, 1, 8, 8)
    shifted = images.clone()
    shifted[:, :, -2:, -2:] += 1.0  # only the last 2x2 patch changes
    for impl in (AttentionImpl.sdpa, AttentionImpl.local):
        torch.manual_seed(0)
        model = recipe.build(dataclasses.replace(cfg.model, attention=impl),
                             ModelContext(tp=1, pp=1, dtype=cfg.train.dtype, pre_process=True,
                                          post_process=True)).eval()
        layer = model.backbone.decoder.layers[0].self_attention.core_attention
        with torch.no_grad():
            out[impl.value] = (layer.attn_mask_type == AttnMaskType.no_mask,
                               model(images).numpy(), model(shifted).numpy())
    return out


def test_vit_attention_is_bidirectional(vit, tmp_path):
    out = run_world(bidirectional_logits, 1, vit("parallel.tp=1", "launcher.nproc_per_node=1",
                                                 "zero=zero0"), tmp=tmp_path)[0]
    for no_mask, logits, shifted in out.values():
        assert no_mask
        assert np.abs(logits - shifted).max() > 1e-4  # the class token attends to the last patch
    np.testing.assert_allclose(out["sdpa"][1], out["local"][1], rtol=1e-5, atol=1e-6)
