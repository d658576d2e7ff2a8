"""Per-phase timers, TFLOP/s / MFU, ETA and the console line, pure."""

import io
import json
import time

import pytest
import torch
from rich.console import Console

from mptk.config.schema import ClusterConfig
from mptk.log import flops, progress
from mptk.log.metrics import format_line
from mptk.log.phases import PHASES, Phases, phase_of, summarize


def test_nested_span_is_subtracted_from_its_parent():
    phases = Phases()
    with phases.span("backward"):
        time.sleep(0.05)
        with phases.span("grad_reduce"):
            time.sleep(0.10)
    phases.step_done()
    got = phases.window()
    assert got["grad_reduce"] == pytest.approx(0.10, abs=0.03)
    assert got["backward"] == pytest.approx(0.05, abs=0.03)  # not 0.15
    assert set(PHASES) <= set(got)


def test_window_is_a_mean_per_step_and_resets():
    phases = Phases()
    for _ in range(4):
        with phases.span("forward"):
            time.sleep(0.02)
        phases.step_done()
    assert phases.window()["forward"] == pytest.approx(0.02, abs=0.01)
    assert phases.window()["forward"] == 0.0


def test_megatron_timer_protocol_and_pause():
    phases = Phases()
    assert phase_of("forward-compute") == "forward" and phase_of("backward-compute") == "backward"
    assert phase_of("backward-send-forward-recv") == "p2p_wait"
    assert phase_of("forward-backward") is None  # the whole schedule is not a phase
    phases("forward-recv", log_level=2).start()
    time.sleep(0.03)
    phases("forward-recv").stop()
    mark = phases.mark()
    with phases.paused():
        phases("forward-compute").start()
        phases("forward-compute").stop()
    assert phases.seconds_since(0, "p2p_wait") == pytest.approx(0.03, abs=0.02)
    assert phases.mark() == mark  # nothing recorded while paused


def test_spans_show_in_a_profiler_trace(tmp_path):
    phases = Phases()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phases.span("forward"):
            torch.ones(4).sum()
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    names = {e.get("name") for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"]}
    assert "mptk.forward" in names


def test_straggler_is_the_rank_with_most_compute_not_most_waiting():
    names = list(PHASES)
    table = torch.zeros(3, len(names), dtype=torch.float64)
    table[0, names.index("p2p_wait")] = 5.0  # waits for the slow one
    table[2, names.index("backward")] = 1.0
    table[1, names.index("forward")] = 0.5
    out = summarize(table, names, ranks=[4, 5, 6])
    assert out["straggler_rank"] == 6 and out["straggler_compute_s"] == 1.0
    assert out["p2p_wait_s_max"] == 5.0 and out["p2p_wait_s_min"] == 0.0


def test_model_flops_follow_megatrons_formula():
    import mptk.recipes.gpt.recipe as gpt

    m = gpt.GPTConfig(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                      vocab_size=50304)
    b, s, l, h, v = 512, 2048, 24, 2048, 50304
    expected = 72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
    assert flops.step_flops(m, b) == pytest.approx(expected, rel=1e-9)


def test_throughput_and_mfu():
    out = flops.throughput(8e12, 2.0, 4, None)
    assert out == {"tflops_per_device": 1.0}  # CPU: no MFU
    assert flops.throughput(8e12, 2.0, 4, 989.0)["mfu"] == pytest.approx(1 / 989)


def test_peak_from_override_table_or_none():
    cpu = torch.device("cpu")
    assert flops.peak_tflops(ClusterConfig(), cpu) is None
    assert flops.peak_tflops(ClusterConfig(peak_tflops=123.0), cpu) == 123.0


def test_eta_and_its_format():
    assert progress.eta_seconds(0, 5.0, 10) is None
    assert progress.eta_seconds(10, 5.0, 20) == 10.0
    assert progress.format_eta(125) == "2:05" and progress.format_eta(3725) == "1:02:05"


def test_bar_only_on_a_terminal():
    out = io.StringIO()
    bar = progress.Bar(10, 0, True, Console(file=out, force_terminal=True, width=100)).start()
    bar.update(5)
    bar.stop()
    assert "5/10" in out.getvalue() and "eta" in out.getvalue()
    plain = io.StringIO()
    quiet = progress.Bar(10, 0, True, Console(file=plain, force_terminal=False)).start()
    quiet.update(5)
    quiet.stop()
    assert plain.getvalue() == "" and not quiet.on


def test_line_shows_throughput_eta_phases_and_straggler():
    row = {"step": 10, "steps": 300, "loss": 5.1, "tflops_per_device": 0.5, "mfu": 0.41,
           "eta_s": 125.0, "forward_s_min": 0.01, "forward_s_max": 0.02, "straggler_rank": 3}
    line = format_line(row)
    for text in ("tflops_per_device 0.5", "mfu 0.410", "eta 2:05", "fwd 0.020(0.010)",
                 "straggler rank 3"):
        assert text in line, line
    assert "straggler" not in format_line({"step": 1, "steps": 2, "loss": 1.0})
