"""A torch.profiler window: ``profile.start_step`` .. ``profile.end_step`` (0-based,
end exclusive) on ``profile.ranks``; one Chrome trace per rank in
``run_dir/profile/rank_<r>.json`` (open it in chrome://tracing or https://ui.perfetto.dev)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mptk.config.schema import ProfileConfig


def trace_path(run_dir: str, rank: int) -> Path:
    return Path(run_dir) / "profile" / f"rank_{rank}.json"


def wanted(cfg: ProfileConfig, rank: int) -> bool:
    """A valid window that includes this rank."""
    return 0 <= cfg.start_step < cfg.end_step and rank in list(cfg.ranks)


def activities() -> list:
    kinds = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        kinds.append(torch.profiler.ProfilerActivity.CUDA)
    return kinds


class Window:
    """Call :meth:`begin` before and :meth:`end` after every step; :meth:`close` at the end."""

    def __init__(self, cfg: ProfileConfig, run_dir: str, rank: int):
        self.cfg, self.rank, self.on = cfg, rank, wanted(cfg, rank)
        self.path = trace_path(run_dir, rank)
        self._prof: Optional[torch.profiler.profile] = None

    def begin(self, step: int) -> None:
        if self.on and self._prof is None and self.cfg.start_step <= step < self.cfg.end_step:
            self._prof = torch.profiler.profile(activities=activities(), record_shapes=True)
            self._prof.__enter__()

    def end(self, step: int) -> None:
        if self._prof is not None:
            self._prof.step()
            if step + 1 >= self.cfg.end_step:
                self.close()

    def close(self) -> Optional[Path]:
        """Stop profiling and write the trace (also when the run ends inside the window)."""
        if self._prof is None:
            return None
        prof, self._prof, self.on = self._prof, None, False
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        return self.path
