"""Layout search: enumerate tp (inside a node), cp, pp, vpp, dp, ZeRO stage, micro-batch,
recomputation and sequence parallelism; keep the valid layouts that fit; rank them by
estimated tokens/s. :class:`Result` keeps why the others were dropped (the training
preflight's own words for them come from ``mptk.cli.plan_report``, above this layer).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from mptk.config import registry
from mptk.config.schema import Recompute, RunConfig
from mptk.plan import RESERVE, Plan, choice_of, make_plan
from mptk.plan.cost import MoEShape, Shape, shape_of
from mptk.plan.hardware import EFFICIENCY, Cluster
from mptk.plan.memory import Choice, Training, training_of
from mptk.plan.partition import even_split

VPP = (2, 3, 4, 6, 8)
"""Model chunks per pipeline rank tried with the interleaved schedule."""
RECOMPUTE = ("none", "selective", "full")
"""``train.recompute`` values tried (method and layers of ``full`` stay the config's)."""


@dataclass(frozen=True, slots=True)
class Knobs:
    """Which optional knobs the search varies: vpp (``parallel.vpp``), recomputation
    (``train.recompute``) and sequence parallelism (``parallel.sp``, at tp > 1)."""

    vpp: bool = True
    recompute: bool = True
    sp: bool = True
    pipeline: bool = True
    """The recipe has a pipeline forward (pp > 1 possible)."""
    cp: bool = True
    """Context parallelism (``parallel.cp``; token sequences only)."""
    moe: bool = False
    """A Mixture-of-Experts model: expert parallelism (``parallel.ep``) is searched, sequence
    parallelism is on at tp > 1 and ZeRO-3 is left out at ep > 1 (as the preflight asks)."""


def knobs_of(cfg: RunConfig) -> Knobs:
    """The knobs to search for ``cfg``'s recipe (pp > 1 needs its pipeline forward)."""
    try:
        pipeline = registry.get(cfg.model.recipe).forward is not None
    except KeyError:
        pipeline = False
    images = cfg.data.source.value in ("digits", "image_folder")
    return Knobs(pipeline=pipeline, cp=not images and cfg.model.attention.value == "sdpa",
                 moe=isinstance(shape_of(cfg.model), MoEShape))


def ep_options(sh: Shape, replicas: int) -> list[int]:
    """Expert-parallel degrees to try: those dividing both the experts and dp x cp (1 for a
    dense model)."""
    if not isinstance(sh, MoEShape):
        return [1]
    return [e for e in divisors(sh.experts) if replicas % e == 0]


def divisors(n: int) -> list[int]:
    """Divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------- enumeration


def _pp_options(sh: Shape, world: int, tp: int, knobs: Knobs) -> list[int]:
    limit = min(world // tp, sh.layers) if knobs.pipeline else 1
    return [p for p in divisors(world // tp) if p <= limit]


def _vpp_options(sh: Shape, pp: int, knobs: Knobs) -> list[int]:
    if pp == 1 or not knobs.vpp:
        return [1]
    return [1] + [v for v in VPP if pp * v <= sh.layers]


def _inner(c: Choice, global_batch: int, knobs: Knobs, asked: Choice) -> Iterator[Choice]:
    """Micro-batch, ZeRO stage, recomputation and sequence parallelism for one (tp, pp, vpp);
    a knob not searched stays as the config has it (``asked``)."""
    per_rank = global_batch // c.dp
    zeros = (0, 1, 2, 3) if c.pp == 1 and c.ep == 1 else (0, 1, 2) if c.pp == 1 else (0, 1)
    recomputes = RECOMPUTE if knobs.recompute else (asked.recompute,)
    sps = (False, True) if knobs.sp and c.tp > 1 else (asked.sp and c.tp > 1,)
    sps = (True,) if knobs.moe and c.tp > 1 else sps  # megatron's MoE layer needs sp at tp > 1
    for micro in divisors(per_rank):
        for zero in zeros:
            for rc in recomputes:
                for sp in sps:
                    yield dataclasses.replace(c, micro=micro, zero=zero, recompute=rc, sp=sp)


def grid(sh: Shape, cluster: Cluster, knobs: Knobs) -> Iterator[Choice]:
    """Every (tp, cp, pp, vpp, ep) with tp dividing the GPUs of a node, tp * cp * pp the world
    and ep dividing the experts and dp x cp."""
    world = cluster.world
    for tp in divisors(cluster.gpus_per_node):
        if world % tp:
            continue
        for cp in divisors(world // tp) if knobs.cp else [1]:
            for pp in _pp_options(sh, world // cp, tp, knobs):
                dp = world // (tp * cp * pp)
                for vpp in _vpp_options(sh, pp, knobs):
                    for ep in ep_options(sh, dp * cp):
                        yield Choice(tp=tp, pp=pp, dp=dp, vpp=vpp, cp=cp, ep=ep)


# --------------------------------------------------------------------------- validity


def model_problems(sh: Shape, c: Choice) -> list[str]:
    """Reasons a (tp, pp, vpp) cannot build the model (mirrors the preflight's checks)."""
    problems = []
    if sh.heads % c.tp:
        problems.append("tp does not divide the attention heads")
    if sh.kv_heads % c.tp:
        problems.append("tp does not divide the query groups")
    if sh.vocab and sh.vocab % c.tp:  # vocabulary-parallel embedding / output layer
        problems.append("tp does not divide the vocabulary")
    return problems + cp_problems(sh, c)


def cp_problems(sh: Shape, c: Choice) -> list[str]:
    """Reasons Ulysses cannot split heads and sequence over cp (mirrors the preflight)."""
    if c.cp == 1:
        return []
    if (sh.heads // c.tp) % c.cp or (sh.kv_heads // c.tp) % c.cp:
        return ["cp does not divide the heads (or query groups) per tp rank"]
    return ["context parallel needs seq % (2 * cp) == 0"] if sh.seq % (2 * c.cp) else []


def sp_problems(sh: Shape, c: Choice) -> list[str]:
    """Reasons sequence parallelism cannot split the sequence (mirrors the preflight)."""
    chunks = c.tp * (2 * c.cp if c.cp > 1 else 1)  # with cp, each of 2*cp chunks splits over tp
    return ["sequence parallel needs seq % tp == 0"] if c.sp and sh.seq % chunks else []


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
        """Count a dropped layout under ``reason``, keeping the first as its example."""
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


def search(cfg: RunConfig, cluster: Cluster, knobs: Optional[Knobs] = None, top: int = 10,
           efficiency: float = EFFICIENCY, reserve: float = RESERVE) -> Result:
    """All layouts of ``cfg``'s model and batch on ``cluster``, best tokens/s first."""
    sh, tr, knobs = shape_of(cfg.model), training_of(cfg), knobs or knobs_of(cfg)
    result, asked = Result(), choice_of(cfg, cluster.world)
    for base in grid(sh, cluster, knobs):
        problems = model_problems(sh, base) + batch_problems(base, tr.global_batch)
        if problems:
            result.reject(problems[0], base)
            continue
        for c in _inner(base, tr.global_batch, knobs, asked):
            late = schedule_problems(c, tr.global_batch) + sp_problems(sh, c)
            if late:
                result.reject(late[0], c)
                continue
            result.evaluated += 1
            _keep(result, _evaluate(sh, tr, cluster, c, efficiency, reserve), top)
    result.ranked.sort(key=lambda p: (-p.timing.tokens_per_s, p.memory.total()))
    result.too_big.sort(key=lambda p: p.memory.total())
    return result


# --------------------------------------------------------------------------- output


def overrides(cfg: RunConfig, c: Choice, cluster: Optional[Cluster] = None) -> list[str]:
    """The command-line overrides that select layout ``c`` (and the cluster size);
    ``parallel.vpp``, ``parallel.cp``, ``train.recompute``, ``parallel.sp`` and ``parallel.ep``
    only where they differ from ``cfg``."""
    asked = choice_of(cfg, c.tp * c.cp * c.pp * c.dp)
    out = [f"parallel.tp={c.tp}", f"parallel.pp={c.pp}", *_vpp(cfg, c.vpp)]
    out += [f"parallel.cp={c.cp}"] if c.cp != asked.cp else []
    out += [f"zero.stage={c.zero}", f"train.micro_batch_size={c.micro}"]
    out += [f"train.recompute={c.recompute}"] if c.recompute != asked.recompute else []
    out += [f"parallel.sp={str(c.sp).lower()}"] if c.sp != asked.sp else []
    out += [f"parallel.ep={c.ep}"] if c.ep != asked.ep else []
    return out + (_cluster(cluster) if cluster else [])


def _vpp(cfg: RunConfig, vpp: int) -> list[str]:
    """``parallel.vpp`` when it differs from what the config has (``null``: no interleaving)."""
    if vpp == 1 and cfg.parallel.vpp in (None, 1):
        return []
    return [f"parallel.vpp={'null' if vpp == 1 else vpp}"]


def _cluster(cluster: Cluster) -> list[str]:
    """The cluster profile's size: one task per GPU."""
    return [f"cluster.nodes={cluster.nodes}", f"cluster.gpus_per_node={cluster.gpus_per_node}",
            f"cluster.tasks_per_node={cluster.gpus_per_node}"]


def configured(cfg: RunConfig, c: Choice, world: int) -> RunConfig:
    """A copy of ``cfg`` set to layout ``c`` (what the training preflight would see)."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp = c.tp, c.pp, c.cp
    cfg.parallel.vpp = c.vpp if c.vpp > 1 else None
    cfg.zero.stage, cfg.train.micro_batch_size = c.zero, c.micro
    cfg.train.recompute, cfg.parallel.sp = Recompute(c.recompute), c.sp
    cfg.parallel.ep = c.ep
    cfg.launcher.nproc_per_node = world
    return cfg
