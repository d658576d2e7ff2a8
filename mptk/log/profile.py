"""A torch.profiler window: ``profile.start_step`` .. ``profile.end_step`` (0-based,
end exclusive) on ``profile.ranks``; one Chrome trace per rank in
``run_dir/profile/rank_<r>.json`` (open it in chrome://tracing or https://ui.perfetto.dev).

On CUDA the window's edges also call ``torch.cuda.profiler.start()`` / ``stop()``
(``cudaProfilerStart/Stop``), so ``nsys profile --capture-range=cudaProfilerApi`` (the sbatch
scripts' opt-in wrapper, ``cluster.nsys=true`` or ``MPTK_NSYS=1``) captures exactly the window.
Under nsys (``MPTK_NSYS=1`` in the environment) torch.profiler records CPU activity only:
two CUPTI clients in one process (kineto and nsys) do not record CUDA reliably.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from mptk.config.schema import ProfileConfig

NSYS_ENV = "MPTK_NSYS"
"""Set to 1 by the sbatch scripts' nsys wrapper in every task's environment."""


def trace_path(run_dir: str, rank: int) -> Path:
    return Path(run_dir) / "profile" / f"rank_{rank}.json"


def wanted(cfg: ProfileConfig, rank: int) -> bool:
    """A valid window that includes this rank."""
    return 0 <= cfg.start_step < cfg.end_step and rank in list(cfg.ranks)


def under_nsys() -> bool:
    return os.environ.get(NSYS_ENV, "0") not in ("", "0")


def activities(cuda: bool) -> list:
    kinds = [torch.profiler.ProfilerActivity.CPU]
    if cuda and not under_nsys():
        kinds.append(torch.profiler.ProfilerActivity.CUDA)
    return kinds


class Window:
    """Call :meth:`begin` before and :meth:`end` after every step; :meth:`close` at the end."""

    def __init__(self, cfg: ProfileConfig, run_dir: str, rank: int):
        self.cfg, self.rank, self.on = cfg, rank, wanted(cfg, rank)
        self.path = trace_path(run_dir, rank)
        self.cuda = torch.cuda.is_available()
        self._prof: Optional[torch.profiler.profile] = None

    def begin(self, step: int) -> None:
        if self.on and self._prof is None and self.cfg.start_step <= step < self.cfg.end_step:
            self._prof = torch.profiler.profile(activities=activities(self.cuda), record_shapes=True)
            self._prof.__enter__()
            if self.cuda:
                torch.cuda.synchronize()  # what ran before the window stays out of nsys's range
                torch.cuda.profiler.start()

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
        if self.cuda:
            torch.cuda.synchronize()  # the window's kernels finish inside nsys's range
            torch.cuda.profiler.stop()
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        return self.path
