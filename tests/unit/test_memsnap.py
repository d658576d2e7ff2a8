"""The CUDA-only debugging paths with CUDA faked at its boundary: the memory snapshot window
and its OOM dump (``torch.cuda.memory._record_memory_history`` / ``_dump_snapshot``), the
profiler window's cudaProfilerApi edges (``torch.cuda.profiler.start`` / ``stop``) that nsys
captures, the peak memory summary; and the flight recorder dump of the hang watchdog."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from mptk.config.schema import DebugConfig, ProfileConfig
from mptk.launch import local
from mptk.log import memory, profile, watchdog

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


@pytest.fixture
def calls(monkeypatch):
    """Every faked CUDA call, in order: (name, args...)."""
    seen: list[tuple] = []

    def record(enabled="all", **kwargs):
        seen.append(("record", enabled, kwargs))

    def dump(path):
        seen.append(("dump", os.path.basename(path)))
        with open(path, "wb") as f:
            pickle.dump({"segments": [], "device_traces": [[]]}, f)

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    return seen


def run_steps(rec: memory.Recorder, steps: range) -> None:
    for step in steps:
        rec.begin(step)
        with rec.guard(step):
            pass
        rec.end(step)


RECORD = ("record", "all", {"context": "all", "stacks": "python", "max_entries": memory.MAX_ENTRIES})


def test_snapshot_window_records_then_dumps_once(calls, tmp_path):
    rec = memory.Recorder(DebugConfig(memory_snapshot=True, memory_snapshot_steps=2),
                          str(tmp_path), 3, CUDA)
    run_steps(rec, range(5))
    rec.close()
    assert calls == [RECORD, ("dump", "rank3_step2.pickle"), ("record", None, {})]
    assert rec.written == [tmp_path / "memory" / "rank3_step2.pickle"]
    assert pickle.loads(rec.written[0].read_bytes())["segments"] == []


def test_snapshot_window_starts_at_the_resumed_step(calls, tmp_path):
    rec = memory.Recorder(DebugConfig(memory_snapshot=True, memory_snapshot_steps=1),
                          str(tmp_path), 0, CUDA, first_step=7)
    run_steps(rec, range(7, 10))
    assert calls == [RECORD, ("dump", "rank0_step8.pickle"), ("record", None, {})]


def test_whole_run_window_dumps_at_close(calls, tmp_path):
    rec = memory.Recorder(DebugConfig(memory_snapshot=True, memory_snapshot_steps=0),
                          str(tmp_path), 1, CUDA)
    run_steps(rec, range(4))
    assert calls == [RECORD]
    rec.close()
    assert calls == [RECORD, ("dump", "rank1_step4.pickle"), ("record", None, {})]


def test_out_of_memory_dumps_then_raises(calls, tmp_path):
    rec = memory.Recorder(DebugConfig(memory_snapshot=True, memory_snapshot_steps=5),
                          str(tmp_path), 2, CUDA)
    run_steps(rec, range(2))
    rec.begin(2)
    with pytest.raises(torch.cuda.OutOfMemoryError), rec.guard(2):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert calls == [RECORD, ("dump", "rank2_step3_oom.pickle"), ("record", None, {})]
    assert (tmp_path / "memory" / "rank2_step3_oom.pickle").exists()
    rec.close()  # nothing more
    assert len(calls) == 3


def test_other_errors_pass_without_a_dump(calls, tmp_path):
    rec = memory.Recorder(DebugConfig(memory_snapshot=True), str(tmp_path), 0, CUDA)
    rec.begin(0)
    with pytest.raises(ValueError), rec.guard(0):
        raise ValueError("not memory")
    assert calls == [RECORD]


@pytest.mark.parametrize("snapshot, device", [(False, CUDA), (True, torch.device("cpu"))])
def test_off_or_on_cpu_nothing_is_called(calls, tmp_path, snapshot, device):
    notes: list[str] = []
    rec = memory.Recorder(DebugConfig(memory_snapshot=snapshot), str(tmp_path), 0, device,
                          say=notes.append)
    run_steps(rec, range(4))
    with pytest.raises(torch.cuda.OutOfMemoryError), rec.guard(4):
        raise torch.cuda.OutOfMemoryError("oom")
    rec.close()
    assert calls == [] and not (tmp_path / "memory").exists()
    assert notes == ([memory.CPU_NOTE.format(device="cpu")] if snapshot else [])


def test_peaks_read_the_allocator_and_summary_names_ranks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4 * 2**30)
    assert memory.peaks(CUDA) == {"allocated": 3072.0, "reserved": 4096.0}
    line = memory.summary([{"allocated": 3072.0, "reserved": 4096.0},
                           {"allocated": 5000.0, "reserved": 3000.0}])
    assert line == ("peak memory over 2 rank(s) (MiB): allocated max 5,000 (rank 1) min 3,072 "
                    "(rank 0); reserved max 4,096 (rank 0) min 3,000 (rank 1)")
    assert memory.peaks(torch.device("cpu"))["rss"] > 10


# --------------------------------------------------------------------------- profiler + nsys


@pytest.fixture
def cuda_profiler(monkeypatch):
    """cudaProfilerStart/Stop and synchronize faked, CUDA reported available."""
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: seen.append("sync"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: seen.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: seen.append("stop"))
    monkeypatch.setattr(profile, "activities", lambda cuda: [torch.profiler.ProfilerActivity.CPU])
    return seen


def test_profiler_window_edges_call_the_cuda_profiler_api(cuda_profiler, tmp_path):
    window = profile.Window(ProfileConfig(start_step=2, end_step=4, ranks=[0]), str(tmp_path), 0)
    for step in range(6):
        window.begin(step)
        cuda_profiler.append(f"step{step}")
        if step == 3:
            assert not window.path.exists()  # the trace is written after stop
        window.end(step)
    assert cuda_profiler == ["step0", "step1", "sync", "start", "step2", "step3", "sync", "stop",
                             "step4", "step5"]
    assert window.path.exists() and window.close() is None


def test_profiler_window_closed_early_stops_the_range(cuda_profiler, tmp_path):
    window = profile.Window(ProfileConfig(start_step=0, end_step=10, ranks=[0]), str(tmp_path), 0)
    window.begin(0)
    window.end(0)
    assert window.close() == window.path
    assert cuda_profiler == ["sync", "start", "sync", "stop"]


def test_ranks_outside_the_window_never_call_it(cuda_profiler, tmp_path):
    window = profile.Window(ProfileConfig(start_step=0, end_step=2, ranks=[0]), str(tmp_path), 1)
    for step in range(3):
        window.begin(step)
        window.end(step)
    assert cuda_profiler == [] and window.close() is None


def test_under_nsys_torch_profiler_leaves_cuda_to_nsys(monkeypatch):
    CPU, GPU = torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA
    monkeypatch.delenv(profile.NSYS_ENV, raising=False)
    assert profile.activities(True) == [CPU, GPU] and profile.activities(False) == [CPU]
    monkeypatch.setenv(profile.NSYS_ENV, "1")
    assert profile.activities(True) == [CPU]
    monkeypatch.setenv(profile.NSYS_ENV, "0")
    assert profile.activities(True) == [CPU, GPU]


# --------------------------------------------------------------------------- flight recorder


def test_flight_recorder_env_and_the_local_launcher(monkeypatch, tmp_path):
    env = watchdog.flight_recorder_env(str(tmp_path))
    assert env == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_FR_DUMP_TEMP_FILE": f"{tmp_path}/flight_recorder/rank_"}
    for name in env:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "50")  # the user's value wins
    local.flight_recorder(str(tmp_path))
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "50"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_FR_DUMP_TEMP_FILE"]
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


FLIGHT_WORLD = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
for _ in range(5):
    dist.all_reduce(torch.ones(7))
from mptk.log.watchdog import dump_flight_recorder
print("\\n".join(dump_flight_recorder(sys.argv[1], 0)))
"""


def test_flight_recorder_dump_of_a_real_gloo_group(tmp_path):
    """A one-rank gloo world in a fresh process: the buffer variable is the one torch reads
    (TORCH_FR_BUFFER_SIZE=3 keeps 3 of 5 all-reduces) and torch's own loader reads the dump."""
    from mptk.launch.runner import free_port

    env = {**os.environ, **watchdog.flight_recorder_env(str(tmp_path)), "TORCH_FR_BUFFER_SIZE": "3"}
    done = subprocess.run([sys.executable, "-c", FLIGHT_WORLD, str(tmp_path), str(free_port())],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    from torch.distributed.flight_recorder.components.loader import read_dump

    dump = read_dump("rank_", str(tmp_path / "flight_recorder" / "rank_0"))
    assert [e["collective_seq_id"] for e in dump["entries"]] == [3, 4, 5]
    assert {e["profiling_name"] for e in dump["entries"]} == {"gloo:all_reduce"}
    assert f"flight recorder: 3 entries in {tmp_path}/flight_recorder/rank_0" in done.stdout
    assert "  seq 5 gloo:all_reduce [[7]] state scheduled (pg 0/default_pg)" in done.stdout


def test_flight_recorder_absent_or_failing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(watchdog, "flight_recorder_bytes", lambda: None)
    assert watchdog.dump_flight_recorder(str(tmp_path), 0) == ["flight recorder: none in this torch build"]

    def broken():
        raise RuntimeError("no process group")

    monkeypatch.setattr(watchdog, "flight_recorder_bytes", broken)
    assert watchdog.dump_flight_recorder(str(tmp_path), 0) == [
        "flight recorder: not dumped (RuntimeError: no process group)"]
    assert not (tmp_path / "flight_recorder").exists()
