"""``mptk-eval`` as a user runs it: on a checkpoint of a tp=1 dp=2 run it gives the run's own
last ``eval_loss`` (metrics.jsonl) at another dp (one process) and at tp=2, with perplexity
and token count; a bad ``--checkpoint`` is one clear line."""

import json
import math

import pytest
from e2e_util import metrics, mptk, tiny

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """3 steps at tp=1 dp=2 (2 eval batches of micro 2 per dp rank: 8 held-out samples),
    checkpoint at the end."""
    out = tmp_path_factory.mktemp("eval_cli") / "run"
    done = mptk(*tiny(cache), "train=smoke", "train.steps=3", "train.eval_interval=0",
                "launcher.nproc_per_node=2", "parallel.tp=1", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = [r for r in metrics(out) if "eval_loss" in r][-1]
    return out, last


def evaluated(run_dir, *overrides):
    done = mptk("--checkpoint", str(run_dir), "--json", *overrides, cmd="mptk-eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # the ranks' own output goes to stderr
    return json.loads(lines[0])


@pytest.mark.parametrize("layout", [("launcher.nproc_per_node=1",),
                                    ("parallel.tp=2", "launcher.nproc_per_node=2")],
                        ids=["tp1_dp1", "tp2"])
def test_eval_equals_the_runs_last_eval_loss(run, layout):
    run_dir, last = run
    got = evaluated(run_dir, *layout)
    assert abs(got["eval_loss"] - last["eval_loss"]) < 1e-5, (got, last)
    assert got["step"] == last["step"] == 3
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]), rel=1e-12)
    assert got["samples"] == 8 and got["tokens"] == 8 * 32
    assert got["layout"].startswith("tp=2" if "parallel.tp=2" in layout else "tp=1")
    assert "dp=1" in got["layout"]


def test_bad_checkpoint_is_one_line(tmp_path):
    done = mptk("--checkpoint", str(tmp_path / "nothing"), cmd="mptk-eval")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mptk-eval: error: {tmp_path / 'nothing'}: no checkpoint there; give a checkpoint, "
        f"checkpoints dir or run dir"]
