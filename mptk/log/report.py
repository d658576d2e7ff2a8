"""The end-of-run report: loss (+ held-out loss), throughput and memory from
``metrics.jsonl``, plotted into ``run_dir/report.png``, and a short text summary."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_NAME = "report.png"
MOE_KEYS = ("moe_aux_loss", "moe_load_min", "moe_load_max")
"""What a Mixture-of-Experts run logs at log steps (:mod:`mptk.models.moe`)."""


def read_rows(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl rows, the last row per step (a resumed run may repeat steps)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def rate_key(rows: list[dict]) -> str | None:
    """The throughput column (``tokens_per_s``, ``images_per_s``, ...)."""
    keys = {k for r in rows for k in r if k.endswith("_per_s")}
    return min(keys) if keys else None


def memory_key(rows: list[dict]) -> str | None:
    """Peak GPU memory (``mem_peak_mb``) when on CUDA, else peak RSS (``rss_mb``)."""
    for key in ("mem_peak_mb", "rss_mb"):
        if any(key in r for r in rows):
            return key
    return None


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have ``key``."""
    pairs = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _panel(ax, rows: list[dict], keys: list[str], title: str) -> None:
    for key in keys:
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report PNG (default ``run_dir/report.png``): loss, throughput, memory, the
    per-phase step times of the slowest rank and, for a MoE run, aux loss and expert load
    (:func:`panels`); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    out = Path(out) if out else Path(run_dir) / REPORT_NAME
    chosen = panels(rows)
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4))
    for ax, (keys, title) in zip(axes, chosen):
        _panel(ax, rows, keys, title)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def panels(rows: list[dict]) -> list[tuple[list[str], str]]:
    """(columns, title) of each panel: loss, throughput, memory, phase times, and for a
    Mixture-of-Experts run (rows with :data:`MOE_KEYS`) its aux loss and expert load."""
    rate, mem = rate_key(rows), memory_key(rows)
    out = [(["loss", "eval_loss"], "loss"), ([rate] if rate else [], f"throughput ({rate or 'n/a'})"),
           ([mem] if mem else [], "peak memory (MiB)"), (phase_keys(rows), "s/step per phase, slowest rank")]
    moe = [key for key in MOE_KEYS if any(key in r for r in rows)]
    return out + ([(moe, "MoE aux loss, expert load (1 = balanced)")] if moe else [])


def phase_keys(rows: list[dict]) -> list[str]:
    """``<phase>_s_max`` columns present (log steps of runs with phase timers)."""
    from mptk.log.phases import PHASES

    return [f"{p}_s_max" for p in PHASES if any(f"{p}_s_max" in r for r in rows)]


def stragglers(rows: list[dict]) -> str | None:
    """``rank 3 (5 of 8 log steps)``: the rank most often slowest."""
    ranks = [r["straggler_rank"] for r in rows if "straggler_rank" in r]
    if not ranks:
        return None
    top = max(set(ranks), key=ranks.count)
    return f"rank {top} ({ranks.count(top)} of {len(ranks)} log steps)"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summary(run_dir: str | Path) -> str:
    """A few lines: steps, first/last loss, last held-out loss, median throughput, memory."""
    rows = read_rows(run_dir)
    if not rows:
        return f"{run_dir}: no metrics"
    lines = [f"run {run_dir}: {rows[-1]['step']}/{rows[-1].get('steps', '?')} steps"]
    _, loss = series(rows, "loss")
    if loss:
        lines.append(f"loss {loss[0]:.4f} -> {loss[-1]:.4f}")
    _, held = series(rows, "eval_loss")
    if held:
        lines.append(f"eval_loss (last) {held[-1]:.4f}")
    rate = rate_key(rows)
    if rate:
        lines.append(f"{rate} (median) {_median(series(rows, rate)[1]):,.1f}")
    memory = memory_key(rows)
    if memory:
        lines.append(f"peak {memory} {max(series(rows, memory)[1]):,.0f}")
    if stragglers(rows):
        lines.append(f"slowest rank {stragglers(rows)}")
    return "\n".join(lines)


def write(run_dir: str | Path) -> Path | None:
    """The end-of-run hook: plot when there are metrics; never raises (a report must not fail
    a finished run)."""
    try:
        return plot(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else None
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        print(f"mptk: report not written: {exc}", flush=True)
        return None
