"""W&B offline files, read back with wandb's own reader (``wandb_files.py``): every step's
metrics row at its step, the resolved config and run meta; a resumed run and a requeued job
continue the same W&B run with the step axis going on."""

import json
from pathlib import Path

import pytest
from e2e_util import metrics, mptk, tiny
from omegaconf import OmegaConf
from wandb_files import offline_runs, read

pytestmark = pytest.mark.e2e

N = 4  # steps of the first run; the resumed one goes to 2N
LOGGED = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "rss_mb")


def args(cache: str, steps: int) -> tuple[str, ...]:
    return (*tiny(cache), "log.wandb.mode=offline", "train=smoke", f"train.steps={steps}",
            "train.eval_interval=2", "parallel.tp=2", "launcher.nproc_per_node=4", "zero=zero1")


@pytest.fixture(scope="module")
def first(tmp_path_factory, cache) -> Path:
    """A finished N-step tp=2 x dp=2 run with offline W&B and a checkpoint at step N."""
    run = tmp_path_factory.mktemp("wandb") / "first"
    done = mptk(*args(cache, N), f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stdout + done.stderr
    return run


def ckpt_meta(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())


def check_history(wb, rows: list[dict]) -> None:
    """One history record per metrics.jsonl row, at its step, with the same keys and values
    (W&B adds ``_step``, ``_runtime``, ``_timestamp``; ``steps`` is left out)."""
    assert wb.steps == [r["step"] for r in rows]
    assert [h["_step"] for h in wb.history] == wb.steps
    for h, r in zip(wb.history, rows):
        assert all(h.get(key) is not None for key in LOGGED), (r["step"], h)
        assert h.get("eval_loss") == r.get("eval_loss"), (r["step"], h)
        for key, value in r.items():  # every key of the row, with the same value
            if key != "steps":
                assert key in h and h[key] == value, (r["step"], key, h.get(key), value)
        assert "steps" not in h


def test_offline_files_hold_every_step_config_and_meta(first):
    rows = metrics(first)
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    folders = offline_runs(first)
    assert len(folders) == 1, folders
    wb = read(folders[0])
    assert folders[0].name.endswith("-" + wb.run_id) and wb.exit_code == 0
    check_history(wb, rows)
    assert [s for s, h in zip(wb.steps, wb.history) if "eval_loss" in h] == [2, 4]

    resolved = OmegaConf.to_container(OmegaConf.load(first / ".hydra" / "config.yaml"))
    resolved["run_dir"] = str(first)
    meta = wb.config.pop("meta")
    assert wb.config == resolved
    assert meta["git_revision"] and len(meta["git_revision"]) == 40
    assert meta["versions"]["torch"] and meta["versions"]["megatron-core"] == "0.16.1"
    assert {k: meta["layout"][k] for k in ("tp", "pp", "dp", "world")} == \
        {"tp": 2, "pp": 1, "dp": 2, "world": 4}
    assert ckpt_meta(first, N)["wandb_run_id"] == wb.run_id


def test_resume_and_requeue_continue_the_same_run(first, cache, tmp_path):
    """Resume from ``first`` into a new run dir up to 2N, stopped by SIGTERM (exit 3) on the
    way and started again in the same run dir, as a requeued job is."""
    run_id = read(offline_runs(first)[0]).run_id
    run = tmp_path / "second"
    more = (*args(cache, 2 * N), f"train.resume={first}", f"hydra.run.dir={run}")
    stopped_run = mptk(*more, env={"MPTK_TEST_SIGTERM_AFTER_STEP": str(N + 1)})
    assert stopped_run.returncode == 3, stopped_run.stdout + stopped_run.stderr
    assert f"at step {N}" in stopped_run.stdout
    stopped = metrics(run)[-1]["step"]
    assert N < stopped < 2 * N
    requeued = mptk(*more)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert f"at step {stopped}" in requeued.stdout

    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(N + 1, 2 * N + 1))
    folders = offline_runs(run)
    assert len(folders) == 2, folders
    resumed, again = read(folders[0]), read(folders[1])
    assert resumed.run_id == again.run_id == run_id  # one W&B run across all three processes
    check_history(resumed, rows[:stopped - N])  # N+1..stopped: the step axis goes on
    check_history(again, rows[stopped - N:])  # stopped+1..2N, nothing redone
    assert resumed.config["train"]["steps"] == again.config["train"]["steps"] == 2 * N
    for step in (stopped, 2 * N):
        assert ckpt_meta(run, step)["wandb_run_id"] == run_id
    lrs = [r["lr"] for r in rows]  # the 2N-step schedule from the first resumed step on
    assert lrs == pytest.approx([schedule_lr(run, s) for s in range(N + 1, 2 * N + 1)], rel=1e-6)


def schedule_lr(run: Path, step: int) -> float:
    """The LR a row of ``run`` shows at ``step`` (set before that step: factor of step - 1)."""
    from mptk.config.load import compose
    from mptk.engine.deepspeed import lr_factor

    cfg = compose(list(OmegaConf.load(run / ".hydra" / "overrides.yaml")))
    return cfg.optim.lr * lr_factor(step - 1, cfg)
