"""What a checkpoint holds besides weights and RNG is one recorded fact (meta.json's
``deepspeed_state`` and ``optim``): the save-time structure check and the resume read it, older
meta without it is read by the rules of then, and ``train.save_reshardable_optim=false``
refuses a resume at another layout (and any run at ep>1) in one line before any process."""

import json

import pytest

from mptk.checkpoint import format as fmt
from mptk.checkpoint import resume
from mptk.config.checks import checkpoint_problems, config_problems
from mptk.config.load import compose
from mptk.config.schema import TrainConfig
from mptk.train.preflight import PreflightError, preflight, startup

ONE_RANK = {"tp": 1, "pp": 1, "vpp": 1, "dp": 1, "cp": 1, "ep": 1, "stage_layers": [],
            "zero_stage": 1, "dtype": "fp32", "global_batch_size": 8}


def checkpoint(folder, meta: dict, model_states=True, optim=True, world=1):
    """A saved-looking checkpoint folder (no manifest: the structure check runs before it)."""
    for sub in ("weights", "rng", "deepspeed", "optim"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "weights" / ".metadata").write_bytes(b"m")
    (folder / fmt.CONFIG).write_text("{}")
    (folder / fmt.META).write_text(json.dumps({"step": 2, **meta}))
    for r in range(world):
        (folder / "rng" / f"rank_{r:05d}.pt").write_bytes(b"r")
    if model_states:
        (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"d")
    if optim:
        (folder / "optim" / ".metadata").write_bytes(b"o")
    return folder


def test_the_recorded_parts_are_what_resume_reads(tmp_path):
    # recorded against the old rules' guess (ep=1, optim/ present): the record wins
    meta = {"layout": ONE_RANK, **fmt.parts_record(deepspeed_state=False, optim=False)}
    folder = checkpoint(tmp_path / "a", meta)
    assert fmt.holds(folder) == {fmt.HOLDS_DEEPSPEED: False, fmt.HOLDS_OPTIM: False}
    assert not resume.reshardable(folder)
    meta = {"layout": {**ONE_RANK, "ep": 2}, **fmt.parts_record(deepspeed_state=True, optim=True)}
    assert fmt.holds(checkpoint(tmp_path / "b", meta, optim=False)) == \
        {fmt.HOLDS_DEEPSPEED: True, fmt.HOLDS_OPTIM: True}


@pytest.mark.parametrize("ep, optim_dir, deepspeed, optim", [
    (1, True, True, True), (1, False, True, False), (2, True, False, True)])
def test_older_meta_without_the_record_is_read_by_the_rules_of_then(tmp_path, ep, optim_dir,
                                                                     deepspeed, optim):
    folder = checkpoint(tmp_path, {"layout": {**ONE_RANK, "ep": ep}}, optim=optim_dir)
    assert fmt.holds(folder) == {fmt.HOLDS_DEEPSPEED: deepspeed, fmt.HOLDS_OPTIM: optim}
    assert resume.reshardable(folder) is optim
    assert fmt.structure_problems(folder, 1) == []


def test_the_structure_check_follows_the_record(tmp_path):
    no_ds = {"layout": ONE_RANK, **fmt.parts_record(deepspeed_state=False, optim=True)}
    assert fmt.structure_problems(checkpoint(tmp_path / "a", no_ds, model_states=False), 1) == []
    both = {"layout": {**ONE_RANK, "ep": 2}, **fmt.parts_record(deepspeed_state=True, optim=True)}
    assert fmt.structure_problems(checkpoint(tmp_path / "b", both, model_states=False,
                                             optim=False), 1) == \
        ["deepspeed/ holds no model states", "optim/.metadata missing"]
    none = {"layout": ONE_RANK, **fmt.parts_record(deepspeed_state=False, optim=False)}
    assert fmt.structure_problems(checkpoint(tmp_path / "c", none), 1) == \
        ["neither deepspeed/ nor optim/ written: no optimizer state"]


def tiny(run_dir, *overrides):
    cfg = compose(["model=gpt_tiny", "train.micro_batch_size=2", "train.global_batch_size=8",
                   "zero=zero1", *overrides])
    cfg.run_dir = str(run_dir)
    return cfg


def test_a_checkpoint_without_optim_resumes_only_at_its_layout(tmp_path):
    saved_cfg = tiny(tmp_path, "parallel.tp=1", "launcher.nproc_per_node=2")
    layout = preflight(saved_cfg, 2, False)
    meta = {"layout": fmt.layout_record(saved_cfg, layout),
            **fmt.parts_record(deepspeed_state=True, optim=False)}
    checkpoint(fmt.checkpoints_dir(tmp_path) / fmt.step_name(2), meta, optim=False, world=2)
    assert startup(saved_cfg, 2, False) == layout  # the same layout: DeepSpeed's own copy
    with pytest.raises(PreflightError) as info:
        startup(tiny(tmp_path, "parallel.tp=1", "launcher.nproc_per_node=4"), 4, False)
    assert len(info.value.problems) == 1, info.value.problems
    line = info.value.problems[0]
    assert "another layout (dp 2->4)" in line and "no optim/" in line
    assert "train.save_reshardable_optim=false" in line and "train.init_from=" in line


def test_an_older_checkpoint_without_optim_keeps_its_own_line(tmp_path):
    line = resume.layout_problem(tmp_path, ONE_RANK, {**ONE_RANK, "dp": 2}, reshardable=False)
    assert "saved by an older mptk" in line and "save_reshardable_optim" not in line


def test_no_reshardable_optim_at_ep_above_1_is_one_line():
    assert checkpoint_problems(TrainConfig(save_reshardable_optim=False)) == []
    assert checkpoint_problems(TrainConfig(), ep=2) == []
    lines = checkpoint_problems(TrainConfig(save_reshardable_optim=False), ep=2)
    assert len(lines) == 1 and lines[0].startswith("train.save_reshardable_optim=false at "
                                                   "parallel.ep=2")
    cfg = compose(["model=gpt_moe_tiny", "launcher.nproc_per_node=4", "parallel.tp=1",
                   "parallel.ep=2", "train.micro_batch_size=4", "train.save_interval=-1",
                   "train.save_reshardable_optim=false"])
    assert config_problems(cfg, 4, False) == lines
