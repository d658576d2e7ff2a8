"""mptk-train as a user runs it: Hydra's flags, bad input, torchrun, multirun, determinism."""

import subprocess

import pytest
from e2e_util import BIN, metrics, mptk, tiny
from omegaconf import OmegaConf

pytestmark = pytest.mark.e2e


def test_help_lists_groups():
    out = mptk("--help")
    assert out.returncode == 0, out.stderr
    for group in ("model:", "parallel:", "zero:", "optim:", "data:", "train:", "launcher:"):
        assert group in out.stdout


def test_cfg_job_prints_composed_config():
    out = mptk("--cfg", "job", "parallel.tp=1", "zero=zero3")
    assert out.returncode == 0, out.stderr
    assert "recipe: gpt" in out.stdout and "stage: 3" in out.stdout and "tp: 1" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("model.num_layerz=3", "model.num_layerz: unknown key"),
    ("train.steps=abc", "train.steps"),
    ("zero=zero7", "no such option in group zero"),
    ("parallel.tp=3", "tp(3)*pp(1)=3 does not divide world(4)"),
    ("train.dtype=fp16", "fp16"),
    ("train.global_batch_size=10", "train.global_batch_size(10)"),
    ("train.init_from=/nonexistent/run", "train.init_from=/nonexistent/run: no checkpoint there"),
    ("train.resume=/nonexistent/run", "train.resume=/nonexistent/run: no checkpoint there"),
])
def test_bad_input_fails_before_any_process(tmp_path, override, message):
    run_dir = tmp_path / "run"
    out = mptk(override, f"hydra.run.dir={run_dir}")
    assert out.returncode == 2
    assert message in out.stderr and "mptk: error:" in out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()  # refused before Hydra creates the run dir


def test_torchrun_tp2(tmp_path, cache):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", str(BIN / "mptk-train"),
         *tiny(cache), "train=smoke", "train.steps=3", "parallel.tp=2", "train.global_batch_size=4",
         "launcher=env", f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tp=2 pp=1 dp=1" in out.stdout
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_multirun_sweeps_two_jobs(tmp_path, cache):
    sweep = tmp_path / "sweep"
    out = mptk("-m", *tiny(cache), "train=smoke", "train.steps=2", "parallel=single",
               "launcher.nproc_per_node=1", "train.global_batch_size=2", "optim.lr=1e-3,2e-3",
               f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stdout + out.stderr
    lrs = {metrics(sweep / str(n))[0]["lr"] for n in (0, 1)}
    assert len(lrs) == 2


def test_same_seed_same_losses(tmp_path, cache):
    runs = []
    for name in ("a", "b"):
        args = (*tiny(cache), "train=smoke", "train.steps=4", "launcher.nproc_per_node=2",
                "parallel.tp=1", "zero=zero1", f"hydra.run.dir={tmp_path / name}")
        out = mptk(*args)
        assert out.returncode == 0, out.stdout + out.stderr
        runs.append([r["loss"] for r in metrics(tmp_path / name)])
    assert runs[0] == runs[1]


def test_resume_none_over_checkpoints_is_refused_and_keeps_them(tmp_path, cache):
    run_dir = tmp_path / "run"
    args = (*tiny(cache), "train=smoke", "train.steps=2", "parallel=single",
            "launcher.nproc_per_node=1", "train.global_batch_size=2", f"hydra.run.dir={run_dir}")
    assert mptk(*args).returncode == 0
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    out = mptk(*args, "train.resume=none")
    assert out.returncode == 2 and "train.resume=none but" in out.stderr, out.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved


def test_resume_with_another_model_is_refused_before_any_process(tmp_path, cache):
    run_dir = tmp_path / "run"
    args = (*tiny(cache), "train=smoke", "train.steps=2", "parallel=single",
            "train.global_batch_size=4", f"hydra.run.dir={run_dir}")
    assert mptk(*args, "launcher.nproc_per_node=1").returncode == 0
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    # Another layout alone resumes (tests/e2e/test_resume_relayout.py); another shape cannot.
    out = mptk(*args, "launcher.nproc_per_node=2", "train.steps=4", "model.num_layers=3")
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [x for x in out.stderr.splitlines() if "another model" in x]
    assert len(lines) == 1 and "model.num_layers 2->3" in lines[0], out.stderr
    assert "layout tp=" not in out.stdout  # no worker started
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")  # Hydra did not rewrite it
    assert saved.train.steps == 2 and saved.launcher.nproc_per_node == 1
