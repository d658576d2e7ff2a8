import pytest
from harness import tiny_overrides

from mptk.config.load import compose
from mptk.config.schema import RunConfig
from mptk.data import tokens


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
