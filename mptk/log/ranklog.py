"""Per-rank log files: every rank writes ``run_dir/logs/rank_<r>.log`` through Python
logging; rank 0 also writes to the console, message only (the same lines ``print`` gave)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER = "mptk"
FILE_FORMAT = "%(asctime)s rank{rank} pid=%(process)d %(levelname)s %(message)s"

_logger = logging.getLogger(LOGGER)


def path(run_dir: str, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank_{rank}.log"


def setup(run_dir: str, rank: int) -> logging.Logger:
    """Attach this rank's file (and on rank 0 the console) to the ``mptk`` logger."""
    close()
    target = path(run_dir, rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(target)
    file.setFormatter(logging.Formatter(FILE_FORMAT.format(rank=rank)))
    _logger.addHandler(file)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        _logger.addHandler(console)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False
    return _logger


def active() -> bool:
    return bool(_logger.handlers)


def info(text: str) -> None:
    """A line in this rank's file (and on rank 0 the console)."""
    _logger.info(text)


def say(text: str, rank0: bool) -> None:
    """``mptk: text``: through the logger once set up, else printed on rank 0 only."""
    if active():
        info(f"mptk: {text}")
    elif rank0:
        print(f"mptk: {text}", flush=True)


def error(text: str) -> None:
    """An error line in this rank's file, and on stderr from every rank (not on stdout)."""
    # logging takes args=None (nothing to %-merge); typeshed only lists tuple/Mapping
    record = _logger.makeRecord(LOGGER, logging.ERROR, __file__, 0, text, None, None)  # type: ignore[arg-type]
    for handler in _logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(text, file=sys.stderr, flush=True)
    flush()


def console_to(stream) -> None:
    """Point rank 0's console handler at ``stream`` (the progress bar's console while it is
    live, so lines print above the bar); ``None`` restores stdout."""
    for handler in _logger.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(stream if stream is not None else sys.stdout)


def flush() -> None:
    for handler in _logger.handlers:
        handler.flush()


def close() -> None:
    """Detach and close every handler (the end of a run, or before a new setup)."""
    for handler in list(_logger.handlers):
        _logger.removeHandler(handler)
        handler.close()
