import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """One tokenized-data cache for the whole e2e session."""
    return str(tmp_path_factory.mktemp("cache"))
