"""``mptk-ckpt inspect``'s config diff: a run whose warm-up ``mptk-train`` clamped to its length
(the saved config holds the clamped value) shows no difference against the overrides that
started it."""

from mptk.cli.ckpt import config_diff
from mptk.cli.train import check_all
from mptk.config.load import compose
from mptk.log.metrics import config_dict


def test_the_clamped_warmup_is_no_difference(tmp_path):
    args = ["train.steps=3", "optim.warmup_steps=10", "parallel.tp=1",
            "launcher.nproc_per_node=1"]
    cfg, _ = check_all(compose(args), str(tmp_path), args)  # what a run saves as config.json
    assert cfg.optim.warmup_steps == 3
    saved = config_dict(cfg)
    assert config_diff(saved, args) == []
    assert config_diff(saved, [*args[1:], "train.steps=20"]) == [
        "  optim.warmup_steps: 3 -> 10", "  train.steps: 3 -> 20"]
