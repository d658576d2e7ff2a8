"""Memory levers, measured: activation bytes saved for backward vs the planner's formula.

A fixed GPT (4 layers, hidden 256, 8 heads, seq 256, vocab 4096, micro-batch 4, fp32, ZeRO-0,
``model.attention=local``) trains at tp=2 on 2 local gloo ranks (``mptk.launch.runner``) for
each of {train.recompute none, selective, full} x {parallel.sp off, on}. Per rank it counts the
bytes autograd saves for backward during one step's forward (``saved_tensors_hooks``; unique
storages, parameters excluded, packs made while backward recomputes excluded), times a few
more steps (median), and prints beside each the planner's activations for one micro-batch at
pp=1 (``mptk.plan.memory.rank_memory``: layers x ``cost.layer_activations`` + ``head_bytes``).

    .venv/bin/python bench/memory_levers.py [--steps N] [--seq S] [--hidden H]
                                            [--dropout P] [--attention local|sdpa] [--detail]

Prints a table, then one JSON line per combination. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import weakref
from collections import Counter
from pathlib import Path

COMBOS = [(r, sp) for sp in (False, True) for r in ("none", "selective", "full")]


def overrides(a: argparse.Namespace, recompute: str, sp: bool) -> list[str]:
    return ["train=smoke", "log=disabled", "zero=zero0", "parallel.tp=2",
            "launcher.nproc_per_node=2", f"parallel.sp={str(sp).lower()}",
            f"train.recompute={recompute}", "model.num_layers=4",
            f"model.hidden_size={a.hidden}", "model.num_attention_heads=8",
            f"model.seq_length={a.seq}", "model.vocab_size=4096", f"model.attention={a.attention}",
            f"model.hidden_dropout={a.dropout}", f"model.attention_dropout={a.dropout}",
            "train.dtype=fp32", "train.micro_batch_size=4", "train.global_batch_size=4",
            "train.eval_interval=0", "data.max_chars=300000", "optim.warmup_steps=1"]


def measure(env, cfg, steps: int) -> dict:
    """On one rank: saved-for-backward bytes of step 0's forward, then timed steps."""
    import torch

    from mptk.train.loop import one_step, setup

    w = setup(cfg, env)
    model = w.engine.module
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []  # names of the modules whose forward is running
    boxes: list = []  # weak references to what the graph holds, one per pack
    skipped = Counter()

    class Box:
        """What the graph stores instead of the tensor: alive exactly while the graph is."""

        __slots__ = ("t", "info", "__weakref__")

        def __init__(self, t, info):
            self.t, self.info = t, info

    def where() -> str:
        """'layers' inside the decoder's layers (or the block's checkpoint), else 'ends'
        (embedding + its dropout, final norm, output layer, loss)."""
        inside = any("decoder" in n for n in stack) and not any("final_layernorm" in n for n in stack)
        return "layers" if inside else "ends"

    def pack(t):
        if torch._C._current_graph_task_id() != -1:  # inside backward (recomputation)
            skipped["backward"] += 1
            return t
        if isinstance(t, torch.nn.Parameter):
            skipped["param"] += 1
            return t
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            skipped["no storage"] += 1
            return t
        if st.data_ptr() in params:
            skipped["param"] += 1
            return t
        top = stack[-1].split(".", 1)[-1] if stack else "?"
        info = (st.data_ptr(), st.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."),
                where(), top.replace("decoder.layers.", "L").split(".", 1)[-1])
        box = Box(t, info)
        boxes.append(weakref.ref(box))
        return box

    saved: dict[int, tuple] = {}

    def snapshot():
        """At the start of backward: unique storages the graph still holds (a tensor packed
        by a graph freed during the forward, e.g. inside a checkpointed layer, is gone)."""
        for ref in boxes:
            box = ref()
            if box is None:
                skipped["freed before backward"] += 1
            elif box.info[0] not in saved:
                saved[box.info[0]] = box.info[1:]

    def push(module, args):
        if id(module) in names:
            stack.append(names[id(module)] or "model")

    def pop(module, args, out):
        if id(module) in names and stack:
            stack.pop()

    from torch.nn.modules import module as nn_module

    hooks = [nn_module.register_module_forward_pre_hook(push),
             nn_module.register_module_forward_hook(pop)]
    backward = w.engine.backward

    def backward_after_snapshot(*args, **kwargs):
        snapshot()
        return backward(*args, **kwargs)

    w.engine.backward = backward_after_snapshot
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t if isinstance(box, Box) else box):
        one_step(w, 0)
    for h in hooks:
        h.remove()
    w.engine.backward = backward
    assert saved, "no backward ran after the forward"
    times = []
    for step in range(1, steps + 1):
        began = time.perf_counter()
        one_step(w, step)
        times.append(time.perf_counter() - began)
    groups: Counter = Counter()
    part: Counter = Counter()
    for nbytes, shape, dtype, at, top in saved.values():
        groups[(at, top, shape, dtype, nbytes)] += 1
        part[at] += nbytes
    detail = sorted(((n * c, c, at, top, list(s), d) for (at, top, s, d, n), c in groups.items()),
                    reverse=True)
    return {"saved_bytes": sum(v[0] for v in saved.values()), "layers_bytes": part["layers"],
            "ends_bytes": part["ends"], "storages": len(saved), "skipped": dict(skipped),
            "step_s": statistics.median(times), "detail": detail}


def planner(cfg, recompute: str, sp: bool) -> dict:
    """The planner's activation bytes on one rank, one micro-batch, pp=1, for this CPU: torch
    keeps dropout's scaled noise in the activation dtype here (``mask = w``), no mask at
    dropout 0."""
    import dataclasses

    from mptk.plan import cost, memory

    sh = cost.shape_of(cfg.model)
    tr = memory.training_of(cfg)
    dropout = max(cfg.model.hidden_dropout, cfg.model.attention_dropout)
    tr = dataclasses.replace(tr, mask=tr.w if dropout > 0 else 0)
    c = memory.Choice(tp=cfg.parallel.tp, pp=1, dp=1, micro=cfg.train.micro_batch_size,
                      recompute=recompute, sp=sp)
    m = memory.rank_memory(sh, c, tr, [sh.layers], 0, reserve=0.0)
    kept = cost.stage_activations(sh, c.micro, c.tp, sp, recompute, tr.w, sh.layers,
                                  tr.recompute_method, tr.recompute_layers, mask=tr.mask)
    # rank_memory's activations may add what full recompute rebuilds in backward (a peak
    # after the forward, not saved by it): shown apart, not compared
    return {"layers": kept, "head": m.head, "total": kept + m.head,
            "transient": m.activations - kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1,
                    help="hidden and attention dropout (Korthikanti's formula counts their masks)")
    ap.add_argument("--attention", choices=["local", "sdpa"], default="local")
    ap.add_argument("--detail", action="store_true", help="rank 0's saved tensors by shape")
    ap.add_argument("--plot", type=Path, help="also draw measured vs planner bars into this PNG")
    a = ap.parse_args()

    from mptk.config.load import compose
    from mptk.data import tokens
    from mptk.launch import runner

    tmp = Path(tempfile.mkdtemp(prefix="mptk-levers-"))
    first = compose(overrides(a, "none", False))
    tokens.prepare(first.data, first.model.vocab_size, log=lambda s: None)  # once, before ranks

    rows = []
    for recompute, sp in COMBOS:
        cfg = compose(overrides(a, recompute, sp))
        cfg.run_dir = str(tmp / f"{recompute}-sp{int(sp)}")
        ranks = runner.run(measure, 2, cfg, a.steps, timeout=900, tmp=tmp, stdout_to_stderr=True)
        pred = planner(cfg, recompute, sp)
        r0 = max(ranks, key=lambda r: r["saved_bytes"])
        got = r0["saved_bytes"]
        rows.append({"recompute": recompute, "sp": sp, "measured_bytes": got,
                     "measured_per_rank": [r["saved_bytes"] for r in ranks],
                     "measured_layers": r0["layers_bytes"], "measured_ends": r0["ends_bytes"],
                     "predicted_bytes": pred["total"], "predicted_layers": pred["layers"],
                     "predicted_head": pred["head"], "predicted_transient": pred["transient"],
                     "ratio": got / pred["total"],
                     "ratio_layers": r0["layers_bytes"] / pred["layers"],
                     "ratio_ends": r0["ends_bytes"] / pred["head"] if pred["head"] else None,
                     "step_s": statistics.median(r["step_s"] for r in ranks),
                     "detail": r0["detail"] if a.detail else None})
        print(f"# {recompute:9s} sp={'on' if sp else 'off'}: done", file=sys.stderr, flush=True)

    base = rows[0]["measured_bytes"]
    print(f"GPT 4 layers, hidden {a.hidden}, 8 heads, seq {a.seq}, vocab 4096, micro-batch 4, "
          f"fp32, ZeRO-0, tp=2 (2 gloo ranks, CPU), attention={a.attention}, dropout={a.dropout}")
    print("MiB per rank saved for backward by one micro-batch's forward; planner = layers kept "
          "+ head (logits + loss); ratio = measured / planner")
    head = (f"{'recompute':9s} {'sp':3s} | {'measured':>8s} {'planner':>8s} {'ratio':>5s} | "
            f"{'layers':>6s} {'plan':>6s} {'ratio':>5s} | {'ends':>5s} {'head':>5s} | "
            f"{'cut':>5s} {'step s':>6s} | {'+bwd peak':>9s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
        print(f"{r['recompute']:9s} {'on' if r['sp'] else 'off':3s} | {m(r['measured_bytes']):>8s} "
              f"{m(r['predicted_bytes']):>8s} {r['ratio']:5.2f} | {m(r['measured_layers']):>6s} "
              f"{m(r['predicted_layers']):>6s} {r['ratio_layers']:5.2f} | "
              f"{m(r['measured_ends']):>5s} {m(r['predicted_head']):>5s} | "
              f"{base / r['measured_bytes']:4.2f}x {r['step_s']:6.3f} | "
              f"{m(r['predicted_transient']):>9s}")
    print("cut: activations of recompute=none, sp=off / this row's; +bwd peak: what the planner "
          "adds for full recompute's rebuilt layer in backward (not measured here)")
    if a.detail:
        for r in rows:
            print(f"\n{r['recompute']} sp={r['sp']}: MiB, count, part, module, shape, dtype")
            for nbytes, count, at, top, shape, dtype in r["detail"]:
                if nbytes >= 2**16:
                    print(f"  {nbytes / 2**20:7.2f}  x{count:<3d} {at:6s} {top:28s} {shape} {dtype}")
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "detail"}))
    if a.plot:
        plot(rows, a.plot)


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars, one pair (measured, planner) per combination, MiB per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['recompute']}\nsp {'on' if r['sp'] else 'off'}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for shift, key, label in ((-0.2, "measured_bytes", "measured (saved for backward)"),
                              (0.2, "predicted_bytes", "planner")):
        bars = ax.bar([i + shift for i in x], [r[key] / 2**20 for r in rows], 0.4, label=label)
        if key == "measured_bytes":
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB per rank, one micro-batch")
    ax.set_ylim(0, 1.3 * max(r["measured_bytes"] for r in rows) / 2**20)  # room for the legend
    ax.set_title("Activation memory at tp=2: recompute x sequence parallelism")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
