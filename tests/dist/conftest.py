import pytest

from mptk.config.load import compose
from mptk.config.schema import RunConfig
from mptk.data import tokens


def tiny_overrides(cache: str) -> list[str]:
    """A GPT small enough for several spawned runs per test on 2 CPU cores."""
    return ["train=smoke", "log=disabled", "model.num_layers=2", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.seq_length=32", "model.vocab_size=512",
            "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_interval=0",
            f"data.cache_dir={cache}", "data.max_chars=300000", "optim.warmup_steps=1"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """Tokenized once for the whole session; workers then hit the cache."""
    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = compose(tiny_overrides(cache))
    tokens.prepare(cfg.data, cfg.model.vocab_size, log=lambda s: None)
    return cache


@pytest.fixture
def tiny(data_cache, tmp_path):
    def make(*overrides: str) -> RunConfig:
        cfg = compose(tiny_overrides(data_cache) + list(overrides))
        cfg.run_dir = str(tmp_path / "run")
        return cfg

    return make
