"""mptk-bench as a user runs it: the tiny shape on the CPU, baselines and mptk's own
path with torch.compile, one JSON line per variant on stdout."""

import json

import pytest
from e2e_util import mptk

pytestmark = pytest.mark.e2e

KEYS = {"variant", "impl", "world", "dtype", "shape", "step_time_s", "tokens_per_s",
        "tflops_per_device", "mfu", "peak_mem_gib", "phases_s", "loss_first", "loss_last"}


def test_bench_tiny_cpu(cache, tmp_path):
    out = tmp_path / "bench.jsonl"
    done = mptk("--shape", "tiny", "--variants", "zero1_compile,torch_compile,torch_eager",
                "--steps", "2", "--warmup", "1", "--out", str(out), f"data.cache_dir={cache}",
                cmd="mptk-bench", timeout=300, env={"OMP_NUM_THREADS": "1"})  # steady on 2 cores
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]  # stdout: JSON only
    assert [r["variant"] for r in lines] == ["torch_compile", "torch_eager", "zero1_compile"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    for r in lines:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and r["mfu"] is None
        assert {"forward", "backward", "optimizer"} <= set(r["phases_s"])
    mptk_line = lines[-1]
    assert mptk_line["impl"] == "mptk" and mptk_line["baseline"] == "torch_compile"
    assert mptk_line["vs_baseline"] > 0 and "grad_reduce" in mptk_line["phases_s"]
    assert mptk_line["shape"]["layers"] == 2 and mptk_line["params_per_rank"] == \
        lines[0]["params_per_rank"]  # the baseline has the recipe's shape
    assert "summary" in done.stderr
