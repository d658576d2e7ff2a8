"""What ``mptk-plan`` prints: a plan's memory and time tables, the search's ranking and
overrides, why layouts were dropped (with the training preflight's own lines), the
``--measure`` comparison, and the JSON forms.

The preflight lives in :mod:`mptk.train`, above the planner, so asking it about a layout
(:func:`explain`, :func:`why`) happens here and :mod:`mptk.plan` stays pure arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rich.console import Console
from rich.table import Table

from mptk.config.schema import RunConfig
from mptk.plan import Choice, Plan, partition
from mptk.plan import search as s
from mptk.plan.cost import total_params
from mptk.plan.hardware import Cluster, GiB
from mptk.plan.memory import Training


def console() -> Console:
    """Rich console; a wide one when piped, so tables are not wrapped in logs."""
    c = Console(highlight=False)
    return c if c.is_terminal else Console(highlight=False, width=150)


def _g(x: float) -> str:
    return f"{x / GiB:,.2f}"


# --------------------------------------------------------------------------- one plan


def describe(cfg: RunConfig, p: Plan) -> str:
    """Two lines: the model and batch, then the layout and cluster."""
    c, cl, tr = p.choice, p.cluster, p.training
    dtype = {2: cfg.train.dtype.value, 4: "fp32"}[tr.w]
    how = f" ({tr.recompute_method}, {tr.recompute_layers})" if c.recompute == "full" else ""
    return (f"{cfg.model.recipe} {total_params(p.shape) / 1e9:.3g}B params, seq {p.shape.seq}, "
            f"global batch {tr.global_batch}, {dtype}, {tr.optimizer}\n"
            f"layout tp={c.tp} pp={c.pp} vpp={c.vpp} dp={c.dp}, ZeRO-{c.zero}, micro {c.micro} x "
            f"{c.grad_acc(tr.global_batch)} accumulation, recompute {c.recompute}{how}, "
            f"sequence parallel {'on' if c.sp else 'off'}; {cl.nodes} x {cl.gpus_per_node} {cl.gpu.name}")


def activation_formula(c: Choice, flash: bool, tr: Training | None = None) -> str:
    """Korthikanti et al.'s per-layer term in use (SDPA keeps no s x s scores: +5as/h dropped);
    full recompute says which layers keep only their input (``train.recompute_method``)."""
    if c.recompute == "full":
        held = "2sbh/t (layer input)" if c.sp else "2sbh (layer input)"
        method, k = (tr.recompute_method, tr.recompute_layers) if tr else ("uniform", 1)
        if method == "block":
            rest = activation_formula(dataclasses.replace(c, recompute="none"), flash)
            return f"{held} on the first {k} layers of each chunk, {rest} on the rest"
        return held + (f" per group of {k} layers" if k > 1 else "")
    scores = not flash and c.recompute == "none"
    if c.sp or c.tp == 1:
        return f"sbh(34{'+5as/h' if scores else ''}){'/t' if c.tp > 1 else ''}"
    return f"sbh(10+24/t{'+5as/(ht)' if scores else ''})"


def buffer_note(c: Choice, tr: Training) -> str:
    """How the DeepSpeed buffers were counted for this stage."""
    if c.zero == 0:
        return "flattened gradients for the dp all-reduce (<= bucket)" if c.dp > 1 else "none at dp 1"
    text = f"reduce bucket {tr.reduce_bucket:,} elements{' x 2 (overlap_comm)' if tr.overlap_comm else ''}"
    text += " + 2 gathered layers" if c.zero == 3 else ""
    return text + (" + fp32 copy of the gradient partition" if c.zero >= 2 and tr.w < 4 else "")


def notes(p: Plan) -> dict[str, str]:
    """How each memory item was counted."""
    c, tr, m = p.choice, p.training, p.memory
    part = f"/ dp {c.dp}" if c.dp > 1 else "(dp 1)"
    opt = "SGD momentum 4 B" if tr.optimizer == "sgd" else "AdamW moments 8 B + step"
    act = activation_formula(c, p.shape.flash, tr)
    rebuilt = " + one recomputed group in backward" if c.recompute == "full" else ""
    return {
        "weights": f"{tr.w} B x {m.params:,} params{' ' + part if c.zero == 3 else ''}",
        "gradients": f"{tr.w} B x params{' ' + part if c.zero >= 2 else ''}",
        "fp32 master": "none (fp32 run at ZeRO-0)" if not m.states.master else
                       f"4 B x params{' ' + part if c.zero >= 1 else ''}",
        "optimizer states": f"{opt}{' ' + part if c.zero >= 1 else ''}",
        "activations": f"{act} x {m.layers} layers x {m.micro_batches:.2f} micro-batches "
                       f"(s={p.shape.seq}, b={c.micro}, h={p.shape.hidden}, t={c.tp}){rebuilt}",
        "logits + loss": "fp32 logits and softmax, last stage",
        "DeepSpeed buffers": buffer_note(c, tr),
        "CUDA context / NCCL / fragmentation": "assumed (--reserve-gib)",
    }


def memory_table(p: Plan) -> Table:
    """The worst rank's memory, item by item, against the card."""
    t = Table(title=f"memory per GPU (pipeline rank {p.memory.rank})")
    for col, just in (("item", "left"), ("GiB", "right"), ("how", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]  # just is one of rich's justify literals
    how = notes(p)
    for name, value in p.memory.rows():
        t.add_row(name, _g(value), how.get(name, ""))
    t.add_row("[bold]total[/]", f"[bold]{_g(p.memory.total())}[/]", "")
    t.add_row("GPU memory", _g(p.cluster.gpu.memory), p.cluster.gpu.name)
    return t


def time_table(p: Plan) -> Table:
    """Step time by part and its share."""
    t = Table(title="step time")
    for col, just in (("part", "left"), ("ms", "right"), ("share", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]  # just is one of rich's justify literals
    for name, value in p.timing.rows():
        t.add_row(name, f"{value * 1e3:,.1f}", f"{value / p.timing.step:.1%}")
    t.add_row("[bold]step[/]", f"[bold]{p.timing.step * 1e3:,.1f}[/]", "100%")
    return t


def stage_table(cfg: RunConfig, p: Plan) -> str:
    """Each pipeline stage's layers, parameters, FLOPs and activations (pp > 1)."""
    c = p.choice
    rows = partition.describe(cfg.model, c.pp, c.vpp, cfg.parallel.layers_per_stage, c.micro,
                              c.tp, c.grad_acc(cfg.train.global_batch_size))
    return "pipeline stages\n" + partition.format_rows(rows)


def show_plan(out: Console, cfg: RunConfig, p: Plan) -> None:
    """The whole report of one layout, ending with the verdict line."""
    out.print(describe(cfg, p))
    if p.choice.pp > 1:
        out.print(stage_table(cfg, p), markup=False, highlight=False)
    out.print(memory_table(p))
    out.print(time_table(p))
    tm = p.timing
    out.print(f"{tm.tokens_per_s:,.0f} tokens/s, {tm.samples_per_s:,.2f} samples/s, MFU {tm.mfu:.1%}, "
              f"pipeline bubble {tm.bubble_share:.1%} of the step")
    out.print(f"[{'green' if p.fits else 'red'}]{p.verdict()}[/]")


def plan_json(p: Plan) -> dict:
    """The ``--json`` form of one plan."""
    return {"choice": dataclasses.asdict(p.choice), "fits": p.fits, "verdict": p.verdict(),
            "memory": {**dict(p.memory.rows()), "total": p.memory.total(), "rank": p.memory.rank},
            "timing": dataclasses.asdict(p.timing)}


# --------------------------------------------------------------------------- search


def search_table(rows: list[Plan]) -> Table:
    """The layouts that fit, fastest first."""
    t = Table(title="layouts that fit, fastest first")
    for col in ("#", "tp", "pp", "vpp", "dp", "ZeRO", "micro", "acc", "recompute", "sp",
                "GiB", "step s", "tokens/s", "MFU"):
        t.add_column(col, justify="right")
    for i, p in enumerate(rows, 1):
        c, tm = p.choice, p.timing
        t.add_row(str(i), str(c.tp), str(c.pp), str(c.vpp), str(c.dp), str(c.zero), str(c.micro),
                  str(c.grad_acc(p.training.global_batch)), c.recompute, "on" if c.sp else "off",
                  _g(p.memory.total()), f"{tm.step:.3f}", f"{tm.tokens_per_s:,.0f}", f"{tm.mfu:.1%}")
    return t


def show_found(out: Console, cfg: RunConfig, cluster: Cluster, best: list[Plan],
               result: s.Result) -> None:
    """The ranking and the overrides to paste, or the smallest layout that did not fit."""
    if not best:
        smallest = result.too_big[0] if result.too_big else None
        out.print("[red]no layout fits[/]" + (f"; the smallest needs {_g(smallest.memory.total())} "
                                               f"GiB per GPU" if smallest else ""))
        return
    out.print(search_table(best))
    out.print("overrides to paste:")
    for i, p in enumerate(best, 1):
        out.print(f"{i:>3}  " + " ".join(s.overrides(cfg, p.choice, cluster)), soft_wrap=True)


def search_json(cfg: RunConfig, cluster: Cluster, best: list[Plan]) -> list[dict]:
    """The ``--search --json`` form: each plan with its overrides."""
    return [{**plan_json(p), "overrides": s.overrides(cfg, p.choice, cluster)} for p in best]


def explain(cfg: RunConfig, c: Choice, world: int) -> list[str]:
    """The training preflight's lines for layout ``c`` (empty when it accepts it)."""
    from mptk.train.preflight import PreflightError, preflight

    try:
        preflight(s.configured(cfg, c, world), world, True)
    except PreflightError as err:
        return list(err.problems)
    return []


def why(cfg: RunConfig, result: s.Result, world: int) -> list[tuple[str, int, Choice, list[str]]]:
    """(reason, how many, an example layout, preflight's lines for it) per reason."""
    rows = []
    for reason, count in result.rejected.most_common():
        example = result.examples[reason]
        lines = [] if reason.startswith("does not fit") else explain(cfg, example, world)
        rows.append((reason, count, example, lines))
    return rows


def why_table(rows: list[tuple[str, int, Choice, list[str]]]) -> Table:
    """:func:`why`'s rows as a table."""
    t = Table(title="why layouts were dropped")
    for col in ("reason", "layouts", "example", "preflight says"):
        t.add_column(col)
    for reason, count, c, lines in rows:
        example = f"tp={c.tp} pp={c.pp} vpp={c.vpp} dp={c.dp}"
        if reason.startswith("does not fit"):
            example += f" ZeRO-{c.zero} micro={c.micro}"
        t.add_row(reason, f"{count:,}", example, "\n".join(lines) or "-")
    return t


# --------------------------------------------------------------------------- measure


def measure_table(rows: list[dict[str, Any]]) -> Table:
    """``--measure``: predicted / held model-state bytes per rank and stage."""
    t = Table(title="model-state bytes per rank: predicted / held by the DeepSpeed engine")
    for col in ("rank", "tp", "dp", "ZeRO", "params", "grads", "master", "optim", "total", "exact"):
        t.add_column(col, justify="right")
    for r in rows:
        pair = [f"{r['predicted'][k]:,.0f} / {r['measured'][k]:,.0f}"
                for k in ("params", "grads", "master", "optim", "total")]
        t.add_row(str(r["rank"]), str(r["tp"]), str(r["dp"]), str(r["zero"]), *pair,
                  "yes" if r["exact"] else f"no ({r['rel_err']:.2%})")
    return t
