"""Which full resumes at another layout run and which are refused, without processes: the
changes named in one line, the fixed settings, checkpoints without reshardable optimizer
state, expert parallelism and another model shape."""

import json
from types import SimpleNamespace

from mptk.checkpoint import resume

SAVED = {"tp": 2, "pp": 1, "vpp": 1, "dp": 2, "cp": 1, "stage_layers": [], "zero_stage": 1,
         "dtype": "fp32", "global_batch_size": 8}


def now(**changes):
    return {**SAVED, **changes}


def test_changes_are_named_in_one_line():
    changes = resume.layout_changes(SAVED, now(tp=1, dp=4, zero_stage=2))
    assert resume.relayout_line(changes) == \
        "resuming at another layout: tp 2->1, dp 2->4, zero 1->2"
    assert resume.layout_changes(SAVED, now()) == []


def test_stages_are_named_only_when_pp_stays():
    assert resume.layout_changes(SAVED, now(tp=1, pp=2, stage_layers=[1, 1])) == \
        ["tp 2->1", "pp 1->2"]
    piped = now(pp=2, stage_layers=[1, 3])
    assert resume.layout_changes(piped, now(pp=2, stage_layers=[2, 2])) == \
        ["stages [1,3]->[2,2]"]


def test_older_meta_without_cp_is_read_as_cp_1():
    old = {k: v for k, v in SAVED.items() if k not in ("cp", "stage_layers")}
    assert resume.layout_changes(old, now()) == []


def test_another_layout_needs_the_reshardable_optimizer_state(tmp_path):
    assert resume.layout_problem(tmp_path, SAVED, now(dp=4), reshardable=True) is None
    line = resume.layout_problem(tmp_path, SAVED, now(dp=4), reshardable=False)
    assert "dp 2->4" in line and "no optim/" in line and "train.init_from=" in line
    assert resume.layout_problem(tmp_path, SAVED, now(), reshardable=False) is None


def test_dtype_and_global_batch_are_kept(tmp_path):
    line = resume.layout_problem(tmp_path, SAVED, now(dtype="bf16", dp=4), reshardable=True)
    assert "dtype fp32->bf16" in line and "train.init_from=" in line
    line = resume.layout_problem(tmp_path, SAVED, now(global_batch_size=16), reshardable=True)
    assert "global_batch_size 8->16" in line


def test_expert_parallel_layout_change_needs_the_reshardable_state(tmp_path):
    assert resume.layout_problem(tmp_path, {**SAVED, "ep": 2}, now(ep=1), reshardable=True) is None
    assert resume.layout_problem(tmp_path, {**SAVED, "ep": 2}, now(ep=2), reshardable=True) is None
    assert "ep 1->2" in resume.layout_problem(tmp_path, SAVED, now(ep=2), reshardable=False)


def test_another_model_shape_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": {"recipe": "gpt", "num_layers": 2, "hidden_size": 64, "dropout": 0.0}}))
    cfg = SimpleNamespace(model=SimpleNamespace(recipe="gpt", num_layers=3, hidden_size=64,
                                                dropout=0.1))
    line = resume.shape_problem(tmp_path, cfg)
    assert "model.num_layers 2->3" in line and "hidden_size" not in line
    cfg.model.num_layers = 2  # dropout is not a shape
    assert resume.shape_problem(tmp_path, cfg) is None
