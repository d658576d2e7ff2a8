"""Pipeline parallelism proven by equality with the pp=1 run on the same weights and batches:
1F1B at pp=2 (tp 1 and 2), pp=2 x dp=2 with ZeRO-1, interleaved pp=2 vpp=2, uneven stages."""

from pathlib import Path

import pytest
import torch
from harness import assert_steps_same as assert_same
from harness import run_world, train_steps

pytestmark = pytest.mark.spawn

PIPE = ("model.num_layers=4", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.grad_clip=1.0")  # 4 micro-batches at dp=1; clipping is active (norms ~3)


def chunks(model):
    return list(model) if isinstance(model, torch.nn.ModuleList) else [model]


def global_key(chunk, key: str) -> str:
    """A stage's parameter name -> the pp=1 model's name (layers carry their global number)."""
    parts = key.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    if key == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


class save_weights:
    """prepare_model hook: keep this tp rank's initial pp=1 weights (picklable for spawn)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, model):
        from mptk.parallel import groups

        torch.save(model.state_dict(), self.folder / f"tp{groups.tp_rank()}of{groups.tp_size()}.pt")


class load_weights(save_weights):
    """prepare_model hook: copy the pp=1 weights into this rank's stage chunks."""

    def __call__(self, model):
        from mptk.parallel import groups

        ref = torch.load(self.folder / f"tp{groups.tp_rank()}of{groups.tp_size()}.pt")
        for chunk in chunks(model):
            state = {k: ref[global_key(chunk, k)] for k in chunk.state_dict()
                     if not k.endswith("_extra_state")}
            chunk.load_state_dict(state, strict=False)


def train_losses(env, cfg, steps, hook):
    from mptk.train.loop import setup

    w = setup(cfg, env, prepare_model=hook)
    return {**train_steps(w, steps), "stages": list(w.layout.stage_layers)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """pp=1 runs: tp=1 (losses) and tp=2 (its per-tp-rank initial weights, equal to tp=1's)."""
    from harness import tiny_overrides

    from mptk.config.load import compose

    folder = tmp_path_factory.mktemp("ref")

    def cfg(*extra):
        c = compose(tiny_overrides(data_cache) + [*PIPE, "zero=zero0", *extra])
        c.run_dir = str(folder / "run")
        return c

    ref = run_world(train_losses, 1, cfg("parallel.tp=1", "launcher.nproc_per_node=1"), 3,
                    save_weights(folder), tmp=folder)[0]
    run_world(train_losses, 2, cfg("parallel.tp=2", "launcher.nproc_per_node=2"), 1,
              save_weights(folder), tmp=folder)
    return ref, folder


def run_pipe(tiny, reference, tmp_path, world, *overrides):
    ref, folder = reference
    cfg = tiny(*PIPE, f"launcher.nproc_per_node={world}", *overrides)
    return run_world(train_losses, world, cfg, 3, load_weights(folder), tmp=tmp_path)


def test_pp2_1f1b_equals_pp1(tiny, reference, tmp_path):
    got = run_pipe(tiny, reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2", "zero=zero0")
    assert_same(reference[0], got[0])
    assert got[0]["loss"] == got[1]["loss"]  # every stage reports the last stage's loss


def test_tp2_pp2_equals_pp1(tiny, reference, tmp_path):
    got = run_pipe(tiny, reference, tmp_path, 4, "parallel.tp=2", "parallel.pp=2", "zero=zero0")
    assert_same(reference[0], got[0], rtol=1e-5)


def test_pp2_dp2_zero1_equals_pp1(tiny, reference, tmp_path):
    got = run_pipe(tiny, reference, tmp_path, 4, "parallel.tp=1", "parallel.pp=2", "zero=zero1")
    assert_same(reference[0], got[0])


def test_interleaved_pp2_vpp2_equals_pp1(tiny, reference, tmp_path):
    """Catches the gloo trap: batched p2p at pp=2 with virtual stages gives wrong gradients."""
    got = run_pipe(tiny, reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2",
                   "parallel.vpp=2", "zero=zero0")
    assert got[0]["stages"] == [1, 1, 1, 1]
    assert_same(reference[0], got[0])


def test_uneven_explicit_stages_equal_pp1(tiny, reference, tmp_path):
    got = run_pipe(tiny, reference, tmp_path, 2, "parallel.tp=1", "parallel.pp=2",
                   "parallel.layers_per_stage=[1,3]", "zero=zero0")
    assert got[0]["stages"] == [1, 3]
    assert_same(reference[0], got[0])
