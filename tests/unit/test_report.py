"""The report from a synthetic metrics.jsonl, the NaN check and the watchdog dump."""

import json
import math
import time

import pytest

from mptk.cli import report as cli
from mptk.config.schema import DebugConfig, NanPolicy
from mptk.log import report, watchdog


def synthetic(run_dir, steps=20, moe=False) -> None:
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "steps": steps, "loss": 8 - 0.2 * s, "lr": 1e-3, "grad_norm": 1.0,
               "tokens_per_s": 1000 + s, "step_time_s": 0.1, "rss_mb": 400 + s}
        if moe:
            row |= {"moe_aux_loss": 1.2 - 0.01 * s, "moe_load_min": 0.5, "moe_load_max": 1.6}
        if s % 10 == 0:
            row["eval_loss"] = 8 - 0.15 * s
        if s % 5 == 0:
            row |= {"forward_s_max": 0.04, "forward_s_min": 0.03, "backward_s_max": 0.05,
                    "backward_s_min": 0.04, "straggler_rank": 3 if s != 5 else 1}
        rows.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")


def test_cli_writes_png_and_summary(tmp_path, capsys):
    synthetic(tmp_path)
    assert cli.main([str(tmp_path)]) == 0
    png = tmp_path / "report.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "20/20 steps" in out and "loss 7.8000 -> 4.0000" in out and "eval_loss (last) 5.0000" in out
    assert "slowest rank rank 3 (3 of 4 log steps)" in out
    assert report.phase_keys(report.read_rows(tmp_path)) == ["forward_s_max", "backward_s_max"]


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # IHDR width


def test_moe_panel_only_for_moe_runs(tmp_path):
    """A MoE run's rows (aux loss, expert load) add a fifth panel; a dense run keeps four."""
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    for path, flag in ((dense, False), (moe, True)):
        path.mkdir()
        synthetic(path, moe=flag)
        report.plot(path)
    titles = [title for _, title in report.panels(report.read_rows(moe))]
    assert report.panels(report.read_rows(moe))[-1][0] == ["moe_aux_loss", "moe_load_min", "moe_load_max"]
    assert len(titles) == 5 and titles[-1].startswith("MoE") and len(report.panels(report.read_rows(dense))) == 4
    assert _png_width(moe / "report.png") == 5 * _png_width(dense / "report.png") // 4


def test_cli_refuses_dir_without_metrics(tmp_path):
    assert cli.main([str(tmp_path)]) == 2


def test_write_never_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    assert report.write(tmp_path) is None


def test_nan_check_skip_policy_continues(capsys):
    assert watchdog.check_finite(DebugConfig(), 3, 0, 1.0, 2.0)
    skip = DebugConfig(nan_policy=NanPolicy.skip)
    assert not watchdog.check_finite(skip, 7, 1, 1.0, math.inf)
    assert "grad_norm=inf at step 7 on rank 1" in capsys.readouterr().err


def test_watchdog_quiet_while_beating(tmp_path):
    dog = watchdog.Watchdog(0.5, str(tmp_path), 0).start()
    for step in range(8):
        time.sleep(0.1)
        dog.beat(step)
    dog.stop()
    assert not (tmp_path / "hang").exists()


@pytest.mark.parametrize("timeout", [0, -1])
def test_watchdog_off(tmp_path, timeout):
    dog = watchdog.Watchdog(timeout, str(tmp_path), 0).start()
    assert not dog._thread.is_alive()


def test_profile_window_writes_chrome_trace(tmp_path):
    import torch

    from mptk.config.schema import ProfileConfig
    from mptk.log import profile

    win = profile.Window(ProfileConfig(start_step=1, end_step=3, ranks=[0]), str(tmp_path), 0)
    x = torch.randn(32, 32)
    for step in range(5):
        win.begin(step)
        x = (x @ x).tanh()
        win.end(step)
    assert win.close() is None  # closed at end_step already
    trace = json.loads(profile.trace_path(str(tmp_path), 0).read_text())
    assert any("aten::mm" in e.get("name", "") for e in trace["traceEvents"])
    other = profile.Window(ProfileConfig(start_step=1, end_step=3, ranks=[0]), str(tmp_path), 1)
    other.begin(1)
    assert other.close() is None and not profile.trace_path(str(tmp_path), 1).exists()
