"""The package layers of the README's architecture section: every import of an mptk package
points to a lower layer (function-local imports included). Packages on one line are peers and
do not import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def layers() -> list[list[str]]:
    """The README's ``layers`` block, top line first: one or more package names per line."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```text\n# layers.*?\n(.*?)```", text, re.S)
    assert block, "README.md lost its '# layers' block in the architecture section"
    rows = [line.split("#")[0].split() for line in block.group(1).splitlines()]
    return [[name.rstrip("/").removesuffix(".py") for name in row] for row in rows if row]


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mptk" and len(parts) > 1 else None


def sources() -> dict[str, Path]:
    """Every module of the library and the bundled recipes (shipped as ``mptk.recipes``)."""
    files = {f"mptk.{p.relative_to(REPO / 'mptk').with_suffix('')}".replace("/", "."): p
             for p in (REPO / "mptk").rglob("*.py")}
    files.update({f"mptk.recipes.{p.relative_to(REPO / 'recipes').with_suffix('')}".replace("/", "."): p
                  for p in (REPO / "recipes").rglob("*.py")})
    return files


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if node.module == "mptk"]
    return found


def violations(rank: dict[str, int], files: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in sorted(files.items(), key=lambda kv: kv[1].name):
        me = package_of(module)
        if me is None or me == "__init__":
            continue
        for line, target in imports(path):
            other = package_of(target)
            if other is None or other == me or other not in rank:
                continue
            if rank[other] >= rank[me]:
                bad.append(f"{path.name}:{line} ({me}) imports mptk.{other}, "
                           f"which is not below it in the README's layers")
    return bad


def test_every_package_has_a_layer():
    named = {name for row in layers() for name in row}
    packages = {p.name for p in (REPO / "mptk").iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in (REPO / "mptk").glob("*.py") if p.stem != "__init__"}
    assert packages | modules | {"recipes"} <= named, sorted((packages | modules) - named)


def ranks() -> dict[str, int]:
    rows = layers()
    return {name: len(rows) - i for i, row in enumerate(rows) for name in row}


def test_imports_point_down_only():
    assert violations(ranks(), sources()) == []


def test_an_upward_or_sideways_import_is_reported(tmp_path):
    """The check can fail: config importing train (up) and models importing data (a peer)."""
    up, side = tmp_path / "up.py", tmp_path / "side.py"
    up.write_text("def f():\n    from mptk.train import loop\n")
    side.write_text("import mptk.data.order\nfrom mptk import exitcodes\n")
    found = violations(ranks(), {"mptk.config.up": up, "mptk.models.side": side})
    assert found == ["side.py:1 (models) imports mptk.data, which is not below it in the README's layers",
                     "up.py:2 (config) imports mptk.train, which is not below it in the README's layers"]
