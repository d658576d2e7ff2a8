"""Layout search: enumerate tp (inside a node), pp, vpp, dp, ZeRO stage, micro-batch,
recomputation and sequence parallelism; keep the valid layouts that fit; rank them by
estimated tokens/s. ``explain`` gives the reasons the others were dropped, in the
training preflight's own words where it has them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Optional

from mptk.plan import RESERVE, Plan, config_path, make_plan, read_knob
from mptk.plan.hardware import EFFICIENCY, Cluster
from mptk.plan.memory import Choice, Shape, Training, even_split, shape_of, training_of

VPP = (2, 3, 4, 6, 8)
"""Model chunks per pipeline rank tried with the interleaved schedule."""
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True, slots=True)
class Knobs:
    """Which optional knobs the search varies (those the config can express, unless
    ``--all-knobs`` asks for the planner-only ones too)."""

    vpp: bool = True
    recompute: bool = False
    sp: bool = False
    pipeline: bool = True
    """The recipe has a pipeline forward (pp > 1 possible)."""


def knobs_of(cfg: Any, all_knobs: bool = False) -> Knobs:
    from mptk.config import registry

    try:
        pipeline = registry.get(cfg.model.recipe).forward is not None
    except (KeyError, AttributeError):
        pipeline = False
    has = {k: all_knobs or config_path(cfg, k) is not None for k in ("vpp", "recompute", "sp")}
    return Knobs(pipeline=pipeline, **has)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- enumeration


def _pp_options(sh: Shape, world: int, tp: int, knobs: Knobs) -> list[int]:
    limit = min(world // tp, sh.layers) if knobs.pipeline else 1
    return [p for p in divisors(world // tp) if p <= limit]


def _vpp_options(sh: Shape, pp: int, knobs: Knobs) -> list[int]:
    if pp == 1 or not knobs.vpp:
        return [1]
    return [1] + [v for v in VPP if pp * v <= sh.layers]


def _inner(c: Choice, global_batch: int, knobs: Knobs) -> Iterator[Choice]:
    """Micro-batch, ZeRO stage, recomputation and sequence parallelism for one (tp, pp, vpp)."""
    per_rank = global_batch // c.dp
    zeros = (0, 1, 2, 3) if c.pp == 1 else (0, 1)
    recomputes = RECOMPUTE if knobs.recompute else ("none",)
    sps = (False, True) if knobs.sp and c.tp > 1 else (False,)
    for micro in divisors(per_rank):
        for zero in zeros:
            for rc in recomputes:
                for sp in sps:
                    yield dataclasses.replace(c, micro=micro, zero=zero, recompute=rc, sp=sp)


def grid(sh: Shape, cluster: Cluster, knobs: Knobs) -> Iterator[Choice]:
    """Every (tp, pp, vpp) with tp dividing the GPUs of a node and tp * pp the world."""
    world = cluster.world
    for tp in divisors(cluster.gpus_per_node):
        if world % tp:
            continue
        for pp in _pp_options(sh, world, tp, knobs):
            for vpp in _vpp_options(sh, pp, knobs):
                yield Choice(tp=tp, pp=pp, dp=world // (tp * pp), vpp=vpp)


# --------------------------------------------------------------------------- validity


def model_problems(sh: Shape, c: Choice) -> list[str]:
    """Reasons a (tp, pp, vpp) cannot build the model (mirrors the preflight's checks)."""
    problems = []
    if sh.heads % c.tp:
        problems.append("tp does not divide the attention heads")
    if sh.kv_heads % c.tp:
        problems.append("tp does not divide the query groups")
    if sh.vocab and not sh.vit[0] and sh.vocab % c.tp:
        problems.append("tp does not divide the vocabulary")
    return problems


def batch_problems(c: Choice, global_batch: int) -> list[str]:
    """Reasons the global batch cannot be split over dp ranks."""
    return ["dp does not divide the global batch"] if global_batch % c.dp else []


def schedule_problems(c: Choice, global_batch: int) -> list[str]:
    """Reasons megatron's schedule refuses the micro-batch count (interleaving: m % pp)."""
    if c.vpp > 1 and c.grad_acc(global_batch) % c.pp:
        return ["interleaved schedule needs micro-batches % pp == 0"]
    return []


# --------------------------------------------------------------------------- search


@dataclass(slots=True)
class Result:
    """Ranked layouts that fit, the best ones that do not, and why others were dropped."""

    ranked: list[Plan] = field(default_factory=list)
    too_big: list[Plan] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, Choice] = field(default_factory=dict)
    evaluated: int = 0

    def reject(self, reason: str, c: Choice, count: int = 1) -> None:
        self.rejected[reason] += count
        self.examples.setdefault(reason, c)


@lru_cache(maxsize=4096)
def _counts(layers: int, stages: int) -> tuple[int, ...]:
    return tuple(even_split(layers, stages))


def _evaluate(sh: Shape, tr: Training, cluster: Cluster, c: Choice, efficiency: float,
              reserve: float) -> Plan:
    counts = list(_counts(sh.layers, c.pp * c.vpp))
    return make_plan(sh, c, tr, cluster, counts, efficiency, reserve, every_rank=False)


def _keep(result: Result, p: Plan, top: int) -> None:
    if p.fits:
        result.ranked.append(p)
    else:
        result.reject("does not fit in GPU memory", p.choice)
        result.too_big.append(p)
        if len(result.too_big) > 4 * top:
            result.too_big = sorted(result.too_big, key=lambda q: q.memory.total())[:top]


def search(cfg: Any, cluster: Cluster, knobs: Optional[Knobs] = None, top: int = 10,
           efficiency: float = EFFICIENCY, reserve: float = RESERVE) -> Result:
    """All layouts of ``cfg``'s model and batch on ``cluster``, best tokens/s first."""
    sh, tr, knobs = shape_of(cfg.model), training_of(cfg), knobs or knobs_of(cfg)
    result = Result()
    for base in grid(sh, cluster, knobs):
        problems = model_problems(sh, base) + batch_problems(base, tr.global_batch)
        if problems:
            result.reject(problems[0], base)
            continue
        for c in _inner(base, tr.global_batch, knobs):
            late = schedule_problems(c, tr.global_batch)
            if late:
                result.reject(late[0], c)
                continue
            result.evaluated += 1
            _keep(result, _evaluate(sh, tr, cluster, c, efficiency, reserve), top)
    result.ranked.sort(key=lambda p: (-p.timing.tokens_per_s, p.memory.total()))
    result.too_big.sort(key=lambda p: p.memory.total())
    return result


# --------------------------------------------------------------------------- output


def overrides(cfg: Any, c: Choice, cluster: Optional[Cluster] = None) -> list[str]:
    """The command-line overrides that select layout ``c`` (and the cluster size); knobs the
    config has no key for are given as ``# knob=value`` notes."""
    out = [f"parallel.tp={c.tp}", f"parallel.pp={c.pp}"]
    out += _optional(cfg, "vpp", c.vpp, 1)
    out += [f"zero.stage={c.zero}", f"train.micro_batch_size={c.micro}"]
    out += _optional(cfg, "recompute", c.recompute, "none")
    out += _optional(cfg, "sp", str(c.sp).lower(), "false")
    out += _cluster(cfg, cluster) if cluster else []
    return sorted(out, key=lambda o: o.startswith("#"))  # notes last: '#' ends a shell line


def _optional(cfg: Any, knob: str, value: Any, default: Any) -> list[str]:
    path = config_path(cfg, knob)
    if path is None:
        return [] if value == default else [f"# {knob}={value} (mptk has no config key for it yet)"]
    current = read_knob(cfg, path)
    if value == default and current in (None, False, 1, default):
        return []
    return [f"{path}={'null' if knob == 'vpp' and value == 1 else value}"]


def _cluster(cfg: Any, cluster: Cluster) -> list[str]:
    node = getattr(cfg, "cluster", None)
    if node is None:
        return [f"# {cluster.nodes} nodes x {cluster.gpus_per_node} GPUs"]
    names = {f.name for f in dataclasses.fields(node)}
    out = [f"cluster.nodes={cluster.nodes}"]
    out += [f"cluster.{k}={cluster.gpus_per_node}" for k in ("gpus_per_node", "tasks_per_node") if k in names]
    return out


def configured(cfg: Any, c: Choice, world: int) -> Any:
    """A copy of ``cfg`` set to layout ``c`` (what the training preflight would see)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.pp = c.tp, c.pp
    if config_path(cfg, "vpp"):
        cfg.parallel.vpp = c.vpp if c.vpp > 1 else None
    cfg.zero.stage, cfg.train.micro_batch_size = c.zero, c.micro
    cfg.launcher.nproc_per_node = world
    return cfg


def explain(cfg: Any, c: Choice, world: int) -> list[str]:
    """The training preflight's lines for layout ``c`` (empty when it accepts it)."""
    from mptk.train.preflight import PreflightError, preflight

    try:
        preflight(configured(cfg, c, world), world, True)
    except PreflightError as err:
        return list(err.problems)
    return []


def why(cfg: Any, result: Result, world: int) -> list[tuple[str, int, Choice, list[str]]]:
    """(reason, how many, an example layout, preflight's lines for it) per reason."""
    rows = []
    for reason, count in result.rejected.most_common():
        example = result.examples[reason]
        lines = [] if reason.startswith("does not fit") else explain(cfg, example, world)
        rows.append((reason, count, example, lines))
    return rows
