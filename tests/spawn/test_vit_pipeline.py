"""The ViT recipe through megatron's pipeline schedule, proven by equality with the pp=1 run on
the same weights and batches (losses, gradient norms, held-out loss and top-1): 1F1B at pp=2,
tp=2 x pp=2, and interleaved pp=2 vpp=2."""

from pathlib import Path

import pytest
import torch
from harness import assert_same, run_world

from mptk.config.load import compose

pytestmark = pytest.mark.spawn

STEPS = 3
# 4 ViT layers (one per virtual stage at vpp=2); 4 micro-batches of 8 digits at dp=1.
PIPE = ("experiment=vit_digits", "log=disabled", f"train.steps={STEPS}", "model.num_layers=4",
        "train.micro_batch_size=8", "train.global_batch_size=32", "train.eval_interval=0",
        "train.eval_batches=2", "train.save_interval=-1", "optim.warmup_steps=1", "zero=zero0")


def chunks(model):
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


def global_key(chunk, key: str) -> str:
    """A stage's parameter name -> the pp=1 model's name (layers carry their global number)."""
    parts = key.split(".")
    if parts[:3] == ["backbone", "decoder", "layers"]:
        parts[3] = str(chunk.backbone.decoder.layers[int(parts[3])].layer_number - 1)
    return ".".join(parts)


class save_weights:
    """prepare_model hook: keep the initial pp=1, tp=1 weights (picklable for spawn)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, model):
        torch.save(model.state_dict(), self.path)


class load_weights(save_weights):
    """prepare_model hook: the pp=1 weights into this rank's stage chunks, split over tp as
    megatron splits its full CPU-initialised matrices."""

    def __call__(self, model):
        from mptk.parallel import groups

        ref, tp, rank = torch.load(self.path), groups.tp_size(), groups.tp_rank()
        for chunk in chunks(model):
            params = dict(chunk.named_parameters())
            state = {}
            for key in chunk.state_dict():
                if key.endswith("_extra_state"):
                    continue
                value, param = ref[global_key(chunk, key)], params.get(key)
                if tp > 1 and getattr(param, "tensor_model_parallel", False):
                    value = value.chunk(tp, dim=param.partition_dim)[rank]
                state[key] = value
            missing = chunk.load_state_dict(state, strict=False).missing_keys
            assert not [k for k in missing if not k.endswith("_extra_state")], missing


def train_and_eval(env, cfg, hook):
    from mptk.train.loop import one_eval, one_step, setup

    w = setup(cfg, env, prepare_model=hook)
    out = {"loss": [], "grad_norm": [], "stages": list(w.layout.stage_layers),
           "names": sorted(k for c in chunks(w.engine.module) for k, _ in c.named_parameters())}
    for step in range(STEPS):
        loss, norm = one_step(w, step)
        out["loss"].append(loss)
        out["grad_norm"].append(norm)
    out["eval"] = one_eval(w)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The pp=1 run (one process) and its initial weights."""
    folder = tmp_path_factory.mktemp("vit_ref")
    cfg = compose([*PIPE, "parallel.tp=1", "parallel.pp=1", "launcher.nproc_per_node=1"])
    cfg.run_dir = str(folder / "run")
    ref = run_world(train_and_eval, 1, cfg, save_weights(folder / "pp1.pt"), tmp=folder)[0]
    assert ref["loss"][0] != ref["loss"][-1]  # training moved the weights
    assert {n.split(".")[0] for n in ref["names"]} == {"backbone", "norm", "head"}
    return ref, folder / "pp1.pt"


def run_pipe(reference, tmp_path, world, *overrides):
    cfg = compose([*PIPE, f"launcher.nproc_per_node={world}", *overrides])
    cfg.run_dir = str(tmp_path / "run")
    return run_world(train_and_eval, world, cfg, load_weights(reference[1]), tmp=tmp_path)


def test_vit_pp2_1f1b_equals_pp1(reference, tmp_path):
    got = run_pipe(reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2")
    assert got[0]["stages"] == [2, 2]
    first, last = ({n.split(".")[1] if n.startswith("backbone") else n.split(".")[0]
                    for n in r["names"]} for r in got)
    assert first == {"conv1", "class_token", "position_embeddings", "ln_pre", "decoder"}
    assert last == {"decoder", "norm", "head"}  # each stage holds only what it runs
    assert_same(reference[0], got[0])
    assert got[0]["loss"] == got[1]["loss"] and got[0]["eval"] == got[1]["eval"]


def test_vit_interleaved_pp2_vpp2_equals_pp1(reference, tmp_path):
    got = run_pipe(reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2", "parallel.vpp=2")
    assert got[0]["stages"] == [1, 1, 1, 1]
    assert_same(reference[0], got[0])


def test_vit_tp2_pp2_equals_pp1(reference, tmp_path):
    got = run_pipe(reference, tmp_path, 4, "parallel.tp=2", "parallel.pp=2")
    assert_same(reference[0], got[0])
