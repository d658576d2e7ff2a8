"""Where the training text comes from: Python's standard library, or user globs."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Directory names skipped under the stdlib: installed packages and test suites."""


def stdlib_root() -> Path:
    """The directory holding Python's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of the standard library, without site-packages and test dirs."""
    root = stdlib_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        paths = (Path(dirpath, f) for f in filenames if f.endswith(".py"))
        files.extend(p for p in paths if p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def files_from_globs(globs: list[str]) -> list[Path]:
    """Sorted, de-duplicated files matched by ``data.paths`` globs (``**`` recurses)."""
    if not globs:
        raise ValueError("data.paths is empty: source=files needs globs of text files")
    found = set()
    for pattern in globs:
        for name in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isfile(name):
                found.add(Path(name).resolve())
    if not found:
        raise ValueError(f"data.paths matched no files: {list(globs)}")
    return sorted(found)


def read_documents(files: list[Path], max_chars: int) -> list[str]:
    """One document per non-empty file (utf-8, errors replaced), at most ``max_chars`` in all.

    The last document is cut short so the total never exceeds ``max_chars``.
    """
    docs: list[str] = []
    total = 0
    for path in files:
        if total >= max_chars:
            break
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        text = text[: max_chars - total]
        if text.strip():
            docs.append(text)
            total += len(text)
    return docs
