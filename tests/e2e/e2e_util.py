"""Helpers for running mptk commands as a user does."""

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def tiny(cache: str) -> list[str]:
    """A GPT that starts and trains in seconds (shared data cache across tests)."""
    return ["log=disabled", "model.num_layers=2", "model.hidden_size=64", "model.seq_length=32",
            "model.vocab_size=512", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.log_interval=1", "optim.warmup_steps=1", f"data.cache_dir={cache}", "data.max_chars=300000"]


def mptk(*args: str, timeout: float = 600, env: dict | None = None,
         cmd: str = "mptk-train") -> subprocess.CompletedProcess:
    """Run an mptk command as a user would; output captured as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / cmd), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_rows_close(ref: dict, got: dict, keys=("loss", "grad_norm"), steps=None,
                      rtol: float = 1e-5) -> None:
    """Two runs' rows (step -> row) agree on ``keys`` at ``steps`` (default: all of ``got``'s)."""
    import numpy as np

    steps = list(steps) if steps is not None else sorted(got)
    for key in keys:
        np.testing.assert_allclose([got[s][key] for s in steps], [ref[s][key] for s in steps],
                                   rtol=rtol, atol=0, err_msg=key)
