"""Preemption and resume through the CLI: a SIGTERM-stopped run continues bit-exactly, and a
rank killed mid-save leaves the previous checkpoint usable."""

import subprocess

import pytest
import torch
from e2e_util import metrics, mptk, tiny

pytestmark = pytest.mark.e2e

STEPS = 8
COMPARED = ("loss", "lr", "grad_norm", "eval_loss")


def per_step(run_dir) -> list[dict]:
    """The compared fields of metrics.jsonl, one row per step in order."""
    rows = {r["step"]: {k: r.get(k) for k in COMPARED} for r in metrics(run_dir)}
    return [rows[s] for s in sorted(rows)]


# ZeRO-3 here; ZeRO-1 resumes bit-exactly in test_context_parallel_cli (cp=2).
@pytest.mark.parametrize("stage", [3])
def test_sigterm_then_resume_continues_exactly(tmp_path, cache, stage):
    args = (*tiny(cache), "train=smoke", "train.eval_interval=0", f"train.steps={STEPS}",
            "parallel.tp=2", "launcher.nproc_per_node=4", f"zero=zero{stage}",
            "train.save_interval=-1")
    ref = mptk(*args, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    run = tmp_path / "run"
    first = mptk(*args, f"hydra.run.dir={run}", env={"MPTK_TEST_SIGTERM_AFTER_STEP": "3"})
    assert first.returncode == 3, first.stdout + first.stderr
    stopped = metrics(run)[-1]["step"]
    assert 3 <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    second = mptk(*args, f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"at step {stopped}" in second.stdout
    assert per_step(run) == per_step(tmp_path / "ref")  # bit-identical, every step


def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, cache):
    args = (*tiny(cache), "train=smoke", "train.eval_interval=0", "train.steps=4",
            "parallel.tp=1", "launcher.nproc_per_node=2", "zero=zero1", "train.save_interval=2")
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = mptk(*args, f"hydra.run.dir={run}", env={"MPTK_TEST_CRASH_IN_SAVE": "1@4"})
    assert first.returncode != 0  # -9 from rank 1, or 1 from its peer (whoever is seen first)
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
    before = per_step(run)
    second = mptk(*args, f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "step_00000002 at step 2" in second.stdout
    assert per_step(run) == before and len(before) == 4  # steps 3-4 redone identically
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not list(ckpts.glob(".tmp-*"))
    check_tools(run, tmp_path / "model.pt")


def check_tools(run, out):
    """``mptk-ckpt inspect`` and ``export`` on a finished run dir."""
    shown = mptk("inspect", str(run), "optim.lr=0.5", cmd="mptk-ckpt")
    assert shown.returncode == 0, shown.stderr
    assert "step        4  (32 samples consumed)" in shown.stdout
    assert "integrity   ok" in shown.stdout and "optim.lr: 0.001 -> 0.5" in shown.stdout
    done = mptk("export", str(run), "--out", str(out), cmd="mptk-ckpt")
    assert done.returncode == 0, done.stderr
    state = torch.load(out)
    assert state["embedding.word_embeddings.weight"].shape == (512, 64)
    assert all(v.dtype == torch.float32 for v in state.values())


def start_in_own_group(args: tuple, out) -> "subprocess.Popen":
    """mptk-train as a terminal's foreground job: its own process group, which a Ctrl-C hits."""
    import subprocess

    from e2e_util import BIN

    return subprocess.Popen([str(BIN / "mptk-train"), *args], stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(run, step: int, proc, timeout: float = 120) -> None:
    import time

    log, end = run / "logs" / "rank_1.log", time.time() + timeout
    while not (log.exists() and f"step {step}/" in log.read_text()):
        assert proc.poll() is None and time.time() < end, "run ended or timed out"
        time.sleep(0.2)


def test_ctrl_c_saves_and_stops_a_second_one_stops_at_once(tmp_path, cache):
    import os
    import signal
    import time

    args = (*tiny(cache), "train=smoke", "train.eval_interval=0", "train.steps=100000",
            "parallel.tp=1", "launcher.nproc_per_node=2", "zero=zero1", "train.save_interval=-1")
    once, twice = tmp_path / "once", tmp_path / "twice"
    with open(tmp_path / "once.out", "w") as out:
        proc = start_in_own_group((*args, f"hydra.run.dir={once}"), out)
        wait_for_step(once, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        assert proc.wait(timeout=120) == 3, (tmp_path / "once.out").read_text()
    stopped = metrics(once)[-1]["step"]
    assert (once / "checkpoints" / f"step_{stopped:08d}").is_dir()
    assert "Ctrl-C" in (tmp_path / "once.out").read_text()
    with open(tmp_path / "twice.out", "w") as out:
        proc = start_in_own_group((*args, f"hydra.run.dir={twice}"), out)
        wait_for_step(twice, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)  # two signals sent at once merge into one pending signal
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130, (tmp_path / "twice.out").read_text()
    assert "stopped at once (second Ctrl-C)" in (tmp_path / "twice.out").read_text()
