"""Run health through the CLI: a NaN loss stops every rank naming rank and step; per-rank log
files; a profiler window; TensorBoard scalars equal to metrics.jsonl; the peak memory summary;
a hang makes every rank dump its stacks and flight recorder and exit instead of hanging; a
SIGKILLed rank ends the run."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
from e2e_util import BIN, metrics, mptk, tiny

pytestmark = pytest.mark.e2e

TWO_RANKS = ("train=smoke", "train.eval_interval=0", "parallel.tp=1", "launcher.nproc_per_node=2",
             "zero=zero1")


def test_nan_stops_with_rank_and_step_and_rank_logs(tmp_path, cache):
    run = tmp_path / "run"
    done = mptk(*tiny(cache), *TWO_RANKS, "train.steps=5", f"hydra.run.dir={run}",
                "profile.start_step=0", "profile.end_step=2", "profile.ranks=[1]",
                env={"MPTK_TEST_NAN_AT_STEP": "3"})
    assert done.returncode != 0, done.stdout + done.stderr
    assert "non-finite loss=nan at step 3 on rank" in done.stderr, done.stderr
    assert "step 2/5 | loss " in done.stdout and "step 3/5" not in done.stdout
    logs = {r: (run / "logs" / f"rank_{r}.log").read_text() for r in (0, 1)}
    for r, text in logs.items():
        assert f" rank{r} pid=" in text
        assert "INFO step 2/5 | loss " in text
        assert f"ERROR mptk: error: non-finite loss=nan at step 3 on rank {r}" in text
    assert "layout tp=1 pp=1 dp=2" in logs[0] and "layout tp=1" in done.stdout
    for r in (0, 1):  # the offending batch: global sample ids of step 3 (0-based 2) per rank
        dump = json.loads((run / "nan" / f"rank_{r}.json").read_text())
        ids = [[16 + 4 * m + 2 * r, 17 + 4 * m + 2 * r] for m in range(2)]  # mbs 2, dp 2, acc 2
        assert dump == {"step": 3, "rank": r, "dp_rank": r, "global_samples": ids}, dump
    trace = json.loads((run / "profile" / "rank_1.json").read_text())  # profile window
    assert trace["traceEvents"] and not (run / "profile" / "rank_0.json").exists()
    names = {event.get("name") for event in trace["traceEvents"]}
    for phase in ("data", "forward", "backward", "grad_reduce", "optimizer"):
        assert f"mptk.{phase}" in names, sorted(n for n in names if n and "mptk" in n)


def gpt_step_flops(batch: int, s: int = 32, l: int = 2, h: int = 64, v: int = 512) -> float:
    """Megatron's model FLOPs per step, written out here independently of mptk."""
    return 72 * batch * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, cache):
    """One 4-rank run (tp=2 x dp=2) shared by the tests below; with TensorBoard on and the
    memory snapshot asked for (CUDA-only: on this CPU a note)."""
    run = tmp_path_factory.mktemp("four") / "run"
    done = mptk(*tiny(cache), "train=smoke", "train.eval_interval=0", "parallel.tp=2",
                "launcher.nproc_per_node=4", "train.steps=4", "train.log_interval=2",
                "cluster.peak_tflops=0.002", "log.tensorboard=true", "debug.memory_snapshot=true",
                f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stdout + done.stderr
    return run, done


def test_four_ranks_report_tflops_mfu_phases_and_straggler(four_ranks):
    run, done = four_ranks
    rows = {r["step"]: r for r in metrics(run)}
    for step, row in rows.items():
        tflops = gpt_step_flops(8) / row["step_time_s"] / 4 / 1e12
        assert row["tflops_per_device"] == pytest.approx(tflops, rel=1e-6)
        assert row["mfu"] == pytest.approx(tflops / 0.002, rel=1e-6)  # peak from the override
        assert row["rss_mb"] > 0
        assert ("straggler_rank" in row) == (step % 2 == 0)  # phases at log steps only
    for step in (2, 4):
        row = rows[step]
        assert row["straggler_rank"] in range(4) and row["eta_s"] >= 0
        for phase in ("data", "forward", "backward", "grad_reduce", "optimizer", "p2p_wait"):
            assert 0 <= row[f"{phase}_s_min"] <= row[f"{phase}_s_max"], (phase, row)
        assert row["forward_s_min"] > 0 and row["backward_s_min"] > 0 and row["p2p_wait_s_max"] == 0
        compute = row["forward_s_max"] + row["backward_s_max"] + row["optimizer_s_max"]
        assert compute < 4 * row["step_time_s"] + 1.0  # per-step means, not sums over the window
    line = next(x for x in done.stdout.splitlines() if x.startswith("step 4/4"))
    assert "tflops_per_device" in line and "mfu" in line and "straggler rank" in line
    assert "eta 0:00" in line


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_rows(four_ranks):
    run, _ = four_ranks
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    board, rows = tensorboard_scalars(run / "tensorboard"), metrics(run)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "eval_loss",
                "step_time_s", "straggler_rank"):
        expected = {r["step"]: r[key] for r in rows if r.get(key) is not None}
        assert expected and board[key].keys() == expected.keys(), (key, board.get(key), expected)
        for step, value in expected.items():  # event files store float32
            assert board[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)
    numeric = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))} - {"step", "steps"}
    assert set(board) == numeric


def test_peak_memory_summary_and_cpu_note(four_ranks):
    run, done = four_ranks
    assert done.stdout.count("debug.memory_snapshot is CUDA-only: this run is on cpu") == 1
    assert not (run / "memory").exists()
    line = next(x for x in done.stdout.splitlines() if "peak memory over 4 rank(s)" in x)
    peaks = [float(v.replace(",", "")) for v in re.findall(r"(?:max|min) ([\d,]+)", line)]
    assert line.startswith("mptk: peak memory over 4 rank(s) (MiB): rss max") and min(peaks) > 50
    for r in range(4):
        own = re.search(rf"peak memory of rank {r} \(MiB\): rss ([\d,]+)",
                        (run / "logs" / f"rank_{r}.log").read_text())
        assert own and min(peaks) <= float(own.group(1).replace(",", "")) <= max(peaks)


def test_hang_dumps_every_rank_and_exits(tmp_path, cache):
    run, timeout = tmp_path / "run", 10
    done = mptk(*tiny(cache), *TWO_RANKS, "train.steps=6", f"debug.hang_timeout_s={timeout}",
                f"hydra.run.dir={run}", timeout=300,
                env={"MPTK_TEST_HANG_RANK": "1", "MPTK_TEST_HANG_AT_STEP": "3"})
    ended = time.time()
    assert done.returncode != 0, done.stdout + done.stderr
    last_step = (run / "metrics.jsonl").stat().st_mtime  # step 2 completed
    assert ended - last_step < 2 * timeout, (ended - last_step, done.stderr)
    for r in (0, 1):
        dump = (run / "hang" / f"rank_{r}.txt").read_text()
        assert f"rank {r}: no step completed" in dump and "last completed step 2" in dump
        assert 'File "' in dump and "Thread 0x" in dump, dump
        assert "flight recorder: " in dump and f"flight_recorder/rank_{r} " in dump, dump
    assert "test_hang" in (run / "hang" / "rank_1.txt").read_text()  # the hung rank's frame
    from torch.distributed.flight_recorder.components.loader import read_dump

    recorded = {r: read_dump("rank_", str(run / "flight_recorder" / f"rank_{r}")) for r in (0, 1)}
    for r, dump in recorded.items():  # torch's own reader: each rank's collectives, in order
        ids = [e["record_id"] for e in dump["entries"]]
        assert dump["rank"] == r and ids == sorted(ids) and len(ids) > 5, dump["entries"][-3:]
        assert all(e["profiling_name"].startswith("gloo:") for e in dump["entries"])
    # the evidence: rank 0 went on into a collective of a group that the hung rank 1 never joined
    stuck = recorded[0]["entries"][-1]
    seqs = {r: max(e["collective_seq_id"] for e in d["entries"]
                   if e["process_group"] == stuck["process_group"]) for r, d in recorded.items()}
    assert seqs[0] == stuck["collective_seq_id"] > seqs[1], (stuck, seqs)
    assert f"seq {seqs[0]} {stuck['profiling_name']}" in (run / "hang" / "rank_0.txt").read_text()


def wait_for(predicate, timeout: float) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.2)


def test_sigkill_of_one_rank_ends_the_run(tmp_path, cache):
    run = tmp_path / "run"
    log = run / "logs" / "rank_1.log"
    proc = subprocess.Popen([str(BIN / "mptk-train"), *tiny(cache), *TWO_RANKS, "train.steps=100000",
                             f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: log.exists() and "step 2/" in log.read_text(), 120)
        os.kill(int(re.search(r"pid=(\d+)", log.read_text()).group(1)), signal.SIGKILL)
        killed = time.time()
        assert proc.wait(timeout=60) != 0 and time.time() - killed < 60
    finally:
        proc.kill()
