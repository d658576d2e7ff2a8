"""The wheel ships every package: pyproject lists packages explicitly (conf/ and recipes/ are
mapped into the package), so a new folder must be listed or an installed mptk lacks it."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def listed() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def on_disk() -> set[str]:
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mptk").rglob("__init__.py")}
    found |= {".".join(("mptk", *p.parent.relative_to(REPO).parts))
              for p in (REPO / "recipes").rglob("__init__.py")}
    return found | {"mptk.conf"}


def test_every_package_is_in_the_wheel():
    assert on_disk() - listed() == set()


def test_no_listed_package_is_missing():
    assert listed() - on_disk() == set()


def test_conf_and_recipes_map_into_the_package():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"mptk.recipes": "recipes", "mptk.conf": "conf"}
    assert (REPO / "conf" / "config.yaml").is_file()
