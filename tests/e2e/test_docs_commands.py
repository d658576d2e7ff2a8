"""Every command the docs mark runnable runs, in document order, in one empty folder.

Markers: a fenced block whose info string is ``bash runnable`` (every command of it), or a
``<!-- runnable -->`` line right above a fenced block (``<!-- runnable commands=1,2 -->``: only
those commands, counted from 1 after joining ``\\``-continued lines). Commands share the folder,
so a later one may read what an earlier one wrote; each must exit 0. The repository's venv is
first on PATH, as after ``source .venv/bin/activate``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\S*)(.*)$")
COMMENT = re.compile(r"^<!--\s*runnable(?:\s+commands=([\d,\s]+))?\s*-->\s*$")


@dataclass(frozen=True)
class Command:
    where: str
    """``file:line`` of the command's first line."""
    text: str


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Backslash-continued lines as one command; blank and comment-only lines dropped."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif line.strip() and not line.lstrip().startswith("#"):
            pending = (number, line.strip())
        if pending is not None and not pending[1].endswith("\\"):
            out.append(pending)
            pending = None
        elif pending is not None:
            pending = (pending[0], pending[1][:-1].rstrip())
    return out


def marked_commands(path: Path, root: Path = ROOT) -> list[Command]:
    """The runnable commands of one Markdown file."""
    lines = path.read_text().splitlines()
    commands, i, wanted = [], 0, None
    while i < len(lines):
        marker = COMMENT.match(lines[i].strip())
        if marker:
            wanted = {int(n) for n in re.findall(r"\d+", marker.group(1) or "")} or "all"
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            wanted = None if lines[i].strip() else wanted
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if "runnable" in fence.group(2).split():
            wanted = "all"
        block = joined([(n + 1, lines[n]) for n in range(i + 1, end)])
        for index, (number, text) in enumerate(block, start=1):
            if wanted == "all" or (wanted and index in wanted):
                commands.append(Command(f"{path.relative_to(root)}:{number}", text))
        wanted, i = None, end + 1
    return commands


def all_commands() -> list[Command]:
    return [c for path in doc_files() for c in marked_commands(path)]


def test_the_marker_parser_reads_both_forms(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("```bash runnable\na --x \\\n  --y   # note\n# skipped\nb\n```\n\n"
                   "```bash\nnot me\n```\n<!-- runnable commands=2 -->\n```bash\nc\nd\n```\n")
    got = [(c.where, c.text) for c in marked_commands(doc, root=tmp_path)]
    assert got == [("d.md:2", "a --x --y   # note"), ("d.md:5", "b"), ("d.md:14", "d")]


def test_every_runnable_doc_command_succeeds(tmp_path):
    commands = all_commands()
    assert len(commands) >= 8, [c.where for c in commands]  # README smoke block + planner
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(BIN.parent)}
    for command in commands:
        out = subprocess.run(["bash", "-c", command.text], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (f"{command.where}: `{command.text}` exited {out.returncode}\n"
                                     f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
