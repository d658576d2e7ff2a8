"""Checkpoints with real gloo ranks: a damaged newest checkpoint falls back (with a warning)
and training continues exactly; weights saved at tp=2 / pp=2 load at tp=1 / pp=1 (and back)
with the same loss. Plus the manifest and schedule rules without processes."""

import json

import pytest
from harness import run_world

import mptk.checkpoint as ck
from mptk.train.preflight import preflight


def train_and_save(env, cfg, steps, save_at):
    """Steps up to ``steps`` (from the restored step), saving after those in ``save_at``."""
    from mptk.train.loop import one_step, setup

    w = setup(cfg, env)
    losses = []
    for step in range(w.start_step, steps):
        losses.append(one_step(w, step)[0])
        if step + 1 in save_at:
            ck.save(w, step + 1)
    return {"start": w.start_step, "losses": losses}


def held_out_loss(env, cfg, steps, save):
    """Train ``steps``, optionally save, return the held-out loss."""
    from mptk.train.loop import one_eval, one_step, setup

    w = setup(cfg, env)
    for step in range(steps):
        one_step(w, step)
    if save:
        ck.save(w, steps)
    return one_eval(w)["eval_loss"]


@pytest.mark.spawn
@pytest.mark.parametrize("optim_copy", [True, False])
def test_damaged_newest_checkpoint_falls_back(tiny, tmp_path, capfd, optim_copy):
    """Also without the reshardable optimizer copy: the same-layout resume stays exact, one at
    another layout is refused in one line before any process."""
    setting = f"train.save_reshardable_optim={str(optim_copy).lower()}"
    cfg = tiny("parallel.tp=1", "launcher.nproc_per_node=2", "zero=zero2", setting)
    first = run_world(train_and_save, 2, cfg, 3, {1, 2}, tmp=tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (newest / "optim" / ".metadata").is_file() is optim_copy
    assert ck.read_json(newest / ck.META)["optim"] is optim_copy
    victim = max((newest / "deepspeed").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])  # a save cut short
    second = run_world(train_and_save, 2, cfg, 3, set(), tmp=tmp_path)
    assert second[0]["start"] == 1
    assert second[0]["losses"] == first[0]["losses"][1:]  # steps 2-3 again, bit-identical
    err = capfd.readouterr().err
    assert "mptk: warning: checkpoint" in err and "step_00000002 is damaged" in err
    assert f"deepspeed/{victim.name}: {size // 2} bytes, manifest says {size}" in err
    assert list(newest.parent.glob("step_00000002.damaged-*"))  # set aside, not retried
    other = tiny("parallel.tp=1", "launcher.nproc_per_node=4", "zero=zero2", setting)
    refused = ck.startup_problems(other, preflight(other, 4, False))
    assert refused == ([] if optim_copy else [refused[0]]), refused
    assert optim_copy or ("dp 2->4" in refused[0] and "no optim/" in refused[0]
                          and "train.save_reshardable_optim=false" in refused[0])


@pytest.mark.spawn
def test_tp2_weights_load_at_tp1_and_back(tiny, tmp_path):
    def cfg(tp, run, *extra):
        c = tiny(f"parallel.tp={tp}", f"launcher.nproc_per_node={tp}", "zero=zero1", *extra)
        c.run_dir = str(tmp_path / run)
        return c

    saved = run_world(held_out_loss, 2, cfg(2, "a"), 2, True, tmp=tmp_path)[0]
    tp1 = run_world(held_out_loss, 1, cfg(1, "b", f"train.init_from={tmp_path / 'a'}"), 0, True,
                    tmp=tmp_path)[0]
    back = run_world(held_out_loss, 2, cfg(2, "c", f"train.init_from={tmp_path / 'b'}"), 0, False,
                     tmp=tmp_path)[0]
    assert abs(tp1 - saved) <= 1e-5 and abs(back - saved) <= 1e-5, (saved, tp1, back)


@pytest.mark.spawn
def test_tp2_pp2_weights_load_at_tp1_pp1(tiny, tmp_path):
    """Saved at tp=2 x pp=2 (interleaved, vpp=2), loaded at tp=1 pp=1: same held-out loss."""
    pipe = ("model.num_layers=4", "zero=zero1")
    a = tiny(*pipe, "parallel.tp=2", "parallel.pp=2", "parallel.vpp=2",
             "launcher.nproc_per_node=4")
    preflight(a, 4, False)
    a.run_dir = str(tmp_path / "a")
    saved = run_world(held_out_loss, 4, a, 2, True, tmp=tmp_path)[0]
    b = tiny(*pipe, "parallel.tp=1", "parallel.pp=1", "launcher.nproc_per_node=1",
             f"train.init_from={tmp_path / 'a'}")
    b.run_dir = str(tmp_path / "b")
    pp1 = run_world(held_out_loss, 1, b, 0, False, tmp=tmp_path)[0]
    assert abs(pp1 - saved) <= 1e-5, (saved, pp1)


# --------------------------------------------------------------------------- no processes


def fake_checkpoint(folder):
    """A published-looking checkpoint with a manifest over two files."""
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "a.bin").write_bytes(b"x" * 100)
    (folder / ck.META).write_text(json.dumps({"step": 5}))
    files = ck.describe(folder, ck.listing(folder))
    (folder / ck.MANIFEST).write_text(json.dumps({"files": files}))
    return folder


def test_verify_names_what_is_wrong(tmp_path):
    good = fake_checkpoint(tmp_path / "step_00000005")
    assert ck.verify(good) == []
    (good / "weights" / "a.bin").write_bytes(b"x" * 99 + b"y")
    assert ck.verify(good) == ["weights/a.bin: content differs from the manifest (blake2b)"]
    (good / "weights" / "a.bin").write_bytes(b"x" * 10)
    assert ck.verify(good) == ["weights/a.bin: 10 bytes, manifest says 100"]
    (good / "weights" / "a.bin").unlink()
    assert ck.verify(good) == ["weights/a.bin: missing"]
    (good / ck.MANIFEST).unlink()
    assert "the save never finished" in ck.verify(good)[0]


def test_listing_order_and_pruning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 10, 4):
        fake_checkpoint(root / ck.step_name(step))
    (root / ".tmp-step_00000012").mkdir()
    assert [p.name for p in ck.candidates(root)] == ["step_00000010", "step_00000004",
                                                       "step_00000002"]
    assert ck.resolve(tmp_path)[0].name == "step_00000010"  # a run dir
    assert [p.name for p in ck.prune(root, 2)] == ["step_00000002"]


@pytest.mark.parametrize("interval, saved", [(0, [8]), (3, [3, 6, 8]), (-1, [])])
def test_save_schedule(interval, saved):
    class Train:
        steps, save_interval = 8, interval

    assert [s for s in range(1, 9) if ck.due(Train, s)] == saved


def test_stop_signal_is_noted_not_fatal():
    import os
    import signal

    from mptk.train import signals

    old = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    try:
        signals.install()
        assert not signals.agree_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.agree_stop() and signals.received() == signal.SIGTERM
    finally:
        signals.reset()
        for sig, handler in old.items():
            signal.signal(sig, handler)
