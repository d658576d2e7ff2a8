"""Pure checks of a run's settings: config and world size in, one line per problem out.

Each line names the factors involved and the fix. Nothing here imports a model, the planner or
the file system; :mod:`mptk.train.preflight` adds the recipe, stage, memory and checkpoint checks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Optional

from mptk.config.schema import (
    Backend,
    ClusterConfig,
    DataConfig,
    DataSource,
    Device,
    DType,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Recompute,
    RunConfig,
    TrainConfig,
    ZeroConfig,
)


class PreflightError(ValueError):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

def config_problems(cfg: RunConfig, world_size: int, cuda_available: bool) -> list[str]:
    """Every problem of ``cfg`` at ``world_size`` processes that the config alone shows."""
    dp = dp_of(cfg.parallel, world_size)
    return [
        *_parallel(cfg.parallel, world_size),
        *_model(cfg.model, cfg.parallel),
        *_batch(cfg.train, dp),
        *_zero(cfg.zero, cfg.parallel),
        *_device(cfg, cuda_available),
        *_train(cfg.train),
        *checkpoint_problems(cfg.train, cfg.parallel.ep),
        *_optim(cfg.optim, cfg.train),
        *_debug(cfg),
        *_data(cfg.data),
        *slurm_world(cfg.cluster, world_size),
        *submitit_tasks(os.environ),
        *_peak_value(cfg.cluster),
        *_pipeline(cfg, dp),
        *_memory_levers(cfg),
        *_context(cfg),
        *_experts(cfg, dp),
    ]


def on_cpu(cfg: RunConfig, cuda_available: bool) -> bool:
    """The run's device is the CPU (asked for, or auto without a visible GPU)."""
    t = cfg.train
    return t.device is Device.cpu or (t.device is Device.auto and not cuda_available)


def dp_of(p: ParallelConfig, world: int) -> int | None:
    """Data-parallel degree, or None when the layout itself is invalid."""
    if p.tp < 1 or p.pp < 1 or p.cp < 1 or world < 1 or world % (p.tp * p.cp * p.pp):
        return None
    return world // (p.tp * p.cp * p.pp)

def _pipeline(cfg: RunConfig, dp: int | None) -> list[str]:
    """pp/vpp rules: vpp needs pp >= 2; interleaving needs micro-batches % pp == 0."""
    p, t = cfg.parallel, cfg.train
    problems = _at_least("parallel.vpp", p.vpp or 1, 1, "use null or a positive chunk count")
    if (p.vpp or 1) > 1 and p.pp < 2:
        problems.append(f"parallel.vpp({p.vpp}) needs parallel.pp >= 2; drop vpp or raise pp")
    if (p.vpp or 1) > 1 and p.pp > 1 and dp and t.micro_batch_size > 0:
        m = t.global_batch_size // max(1, t.micro_batch_size * dp)
        if m % p.pp:
            problems.append(f"interleaved schedule: micro-batches({m}) = global_batch_size("
                            f"{t.global_batch_size})/(micro_batch_size({t.micro_batch_size})*dp("
                            f"{dp})) must be a multiple of pp({p.pp}); change the batch sizes")
    if (p.vpp or 1) > 1 and p.pp > 1 and t.eval_batches % p.pp:  # held-out micro-batches too
        problems.append(f"interleaved schedule: train.eval_batches({t.eval_batches}) must be a "
                        f"multiple of pp({p.pp}); e.g. train.eval_batches={2 * p.pp}")
    return problems

# --------------------------------------------------------------------------- helpers

def _at_least(name: str, value: float, low: float, fix: str) -> list[str]:
    return [] if value >= low else [f"{name}({value}) must be >= {low}; {fix}"]

def _divisible(name: str, value: int, by_name: str, by: int, fix: str) -> list[str]:
    """``value % by == 0`` (skipped when ``by`` is invalid; that has its own line)."""
    if by < 1 or value % by == 0:
        return []
    return [f"{name}({value}) is not divisible by {by_name}({by}); {fix}"]

# --------------------------------------------------------------------------- groups

def _parallel(p: ParallelConfig, world: int) -> list[str]:
    problems = [
        *_at_least("parallel.tp", p.tp, 1, "set the tensor-parallel degree to 1 or more"),
        *_at_least("parallel.pp", p.pp, 1, "set the pipeline-parallel degree to 1 or more"),
        *_at_least("parallel.cp", p.cp, 1, "set the context-parallel degree to 1 or more"),
        *_at_least("world", world, 1, "start at least one process (launcher.nproc_per_node)"),
    ]
    if problems:
        return problems
    size = p.tp * p.cp * p.pp
    axes = "tp*pp" if p.cp == 1 else "tp*cp*pp"  # world = tp * cp * pp * dp
    name = f"tp({p.tp})*pp({p.pp})" if p.cp == 1 else f"tp({p.tp})*cp({p.cp})*pp({p.pp})"
    if size > world:
        return [
            f"parallel: {name}={size} exceeds world({world}); "
            f"lower {axes.replace('*', '/')} or raise launcher.nproc_per_node to a multiple of {size}"
        ]
    if world % size:
        return [
            f"parallel: {name}={size} does not divide world({world}); "
            f"choose {axes} dividing the world size or change launcher.nproc_per_node"
        ]
    return []

def _model(m: ModelConfig, p: ParallelConfig) -> list[str]:
    return [*_model_sizes(m), *_heads(m, p), *_layers(m, p), *_vocab(m, p)]

def _model_sizes(m: ModelConfig) -> list[str]:
    return [
        *_at_least("model.num_layers", m.num_layers, 1, "give the model at least one layer"),
        *_at_least("model.hidden_size", m.hidden_size, 1, "give the model a positive width"),
        *_at_least("model.num_attention_heads", m.num_attention_heads, 1, "use at least one head"),
        *_at_least("model.seq_length", m.seq_length, 1, "use sequences of at least one token"),
        *_ffn(m.ffn_hidden_size),
        *_dropout("model.hidden_dropout", m.hidden_dropout),
        *_dropout("model.attention_dropout", m.attention_dropout),
    ]

def _ffn(ffn: int | None) -> list[str]:
    if ffn is None or ffn >= 1:
        return []
    return [f"model.ffn_hidden_size({ffn}) must be >= 1; set a positive MLP width or null for 4 x hidden"]

def _dropout(name: str, value: float) -> list[str]:
    if 0.0 <= value < 1.0:
        return []
    return [f"{name}({value}) must be in [0, 1); use a dropout probability such as 0.1"]

def _heads(m: ModelConfig, p: ParallelConfig) -> list[str]:
    heads, groups = m.num_attention_heads, m.num_query_groups
    problems = _divisible(
        "model.num_attention_heads", heads, "parallel.tp", p.tp,
        f"choose parallel.tp dividing {heads} or change the head count",
    )
    problems += _divisible(
        "model.hidden_size", m.hidden_size, "model.num_attention_heads", heads,
        "make hidden_size a multiple of the head count",
    )
    return problems + ([] if groups is None else _query_groups(heads, groups, p.tp))

def _query_groups(heads: int, groups: int, tp: int) -> list[str]:
    """Grouped-query attention: groups split over tp ranks and heads split over groups."""
    if groups < 1:
        return [f"model.num_query_groups({groups}) must be >= 1; use null for multi-head attention"]
    return [
        *_divisible(
            "model.num_query_groups", groups, "parallel.tp", tp,
            f"choose parallel.tp dividing {groups} or change num_query_groups",
        ),
        *_divisible(
            "model.num_attention_heads", heads, "model.num_query_groups", groups,
            f"choose num_query_groups dividing {heads}",
        ),
    ]

def _layers(m: ModelConfig, p: ParallelConfig) -> list[str]:
    """Layers need not divide by pp (stages may be uneven), but every stage needs one."""
    stages = p.pp * (p.vpp or 1)
    if p.pp < 1 or m.num_layers < 1 or m.num_layers >= stages:
        return []
    return [f"model.num_layers({m.num_layers}) < pp({p.pp})*vpp({p.vpp or 1})={stages}: every "
            f"pipeline stage needs a layer; lower parallel.pp/vpp or add layers"]

def _vocab(m: ModelConfig, p: ParallelConfig) -> list[str]:
    """Recipes with a vocabulary: at least 2 tokens, split evenly over tp ranks."""
    vocab = getattr(m, "vocab_size", None)
    if vocab is None:
        return []
    if vocab < 2:
        return [f"model.vocab_size({vocab}) must be >= 2; use a real vocabulary size such as 4096"]
    padded = -(-vocab // max(p.tp, 1)) * max(p.tp, 1)
    return _divisible(
        "model.vocab_size", vocab, "parallel.tp", p.tp, f"pad it to a multiple of {p.tp} (e.g. {padded})"
    )

def _batch(t: TrainConfig, dp: int | None) -> list[str]:
    micro, total = t.micro_batch_size, t.global_batch_size
    problems = [
        *_at_least("train.micro_batch_size", micro, 1, "use at least one sample per forward pass"),
        *_at_least("train.global_batch_size", total, 1, "use at least one sample per step"),
    ]
    if problems or dp is None or total % (micro * dp) == 0:
        return problems
    return [
        f"train.global_batch_size({total}) != micro_batch_size({micro}) * grad_acc * dp({dp}): "
        f"make it a multiple of {micro * dp} (or change train.micro_batch_size)"
    ]

def _zero(z: ZeroConfig, p: ParallelConfig) -> list[str]:
    if z.stage not in (0, 1, 2, 3):
        return [f"zero.stage({z.stage}) must be 0, 1, 2 or 3; pick a ZeRO stage (zero=zero0..zero3)"]
    problems = []
    if z.stage >= 2 and p.pp > 1:
        problems.append(
            f"zero.stage({z.stage}) with parallel.pp({p.pp}): DeepSpeed refuses ZeRO-2/3 with "
            "pipeline parallelism; use zero.stage<=1 or parallel.pp=1"
        )
    if z.offload_params and z.stage != 3:
        problems.append(
            f"zero.offload_params needs zero.stage=3 (got {z.stage}); "
            "use zero=zero3_offload or zero.offload_params=false"
        )
    return problems

def _device(cfg: RunConfig, cuda: bool) -> list[str]:
    t, backend = cfg.train, cfg.launcher.backend
    cpu = on_cpu(cfg, cuda)
    problems = []
    if t.device is Device.cuda and not cuda:
        problems.append("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.dtype is DType.fp16 and cpu:
        problems.append("train.dtype=fp16 is not supported on CPU; use train.dtype=bf16 or fp32")
    if backend is Backend.nccl and cpu:
        problems.append("launcher.backend=nccl needs CUDA but the run is on CPU; use launcher.backend=auto or gloo")
    return problems

def _peak_value(cluster: ClusterConfig) -> list[str]:
    if cluster.peak_tflops is not None and cluster.peak_tflops <= 0:
        return [f"cluster.peak_tflops({cluster.peak_tflops}) must be > 0 (the device's "
                f"peak dense TFLOP/s for MFU); or leave it unset"]
    return _gloo_loopback(cluster)


def _gloo_loopback(cluster: ClusterConfig) -> list[str]:
    """gloo bound to loopback cannot reach another node."""
    name = cluster.env.get("GLOO_SOCKET_IFNAME", "")
    if cluster.nodes > 1 and name.split(",")[0] == "lo":
        return [f"cluster.env.GLOO_SOCKET_IFNAME={name} with cluster.nodes({cluster.nodes}) > 1: "
                "loopback does not reach the other nodes; name their NIC, or drop the variable "
                "(each task then picks the interface of its route to MASTER_ADDR)"]
    return []


def sequence_parallel(p: ParallelConfig, m: ModelConfig) -> bool:
    """``parallel.sp``, or on for a MoE model at tp > 1: megatron's MoE layer refuses to train
    with tensor parallelism without sequence parallelism."""
    return p.sp or (p.tp > 1 and bool(getattr(m, "num_experts", None)))


def _memory_levers(cfg: RunConfig) -> list[str]:
    """Sequence parallelism splits the sequence over tp ranks; recomputation counts layers."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    problems = []
    if p.sp and p.tp < 2:
        problems.append(f"parallel.sp=true needs parallel.tp >= 2 (got tp({p.tp})); raise tp or "
                        f"set parallel.sp=false")
    if sequence_parallel(p, m) and p.tp >= 2:
        problems += _divisible("model.seq_length", m.seq_length, "parallel.tp", p.tp,
                               "sequence parallelism splits every sequence over the tp ranks")
    if t.recompute is Recompute.full:
        problems += _at_least("train.recompute_layers", t.recompute_layers, 1,
                              "recompute at least one layer (or train.recompute=none)")
        if t.recompute_layers > m.num_layers >= 1:
            problems.append(f"train.recompute_layers({t.recompute_layers}) > model.num_layers("
                            f"{m.num_layers}); use at most the layer count")
    return problems


def _context(cfg: RunConfig) -> list[str]:
    """Context parallelism (Ulysses): heads and query groups of a tp rank split over cp, the
    sequence in 2*cp equal chunks (megatron's load-balanced order), token data only."""
    p, m = cfg.parallel, cfg.model
    if p.cp <= 1 or p.tp < 1:
        return []
    problems = []
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    for name, count in (("heads", heads), ("num_query_groups", groups)):
        if count % p.tp == 0 and (count // p.tp) % p.cp:
            problems.append(f"parallel.cp: {name}({count})/tp({p.tp}) % cp({p.cp}) != 0; the "
                            f"all-to-all gives every cp rank {name}/tp/cp heads: choose cp "
                            f"dividing {count // p.tp} or change model.{_head_field(name)}")
    sp = sequence_parallel(p, m)
    chunk = 2 * p.cp * (p.tp if sp else 1)
    if m.seq_length % chunk:
        factors = f"2*cp({p.cp})" + (f"*tp({p.tp}) (sp)" if sp else "")
        problems.append(f"model.seq_length({m.seq_length}) % {factors} != 0; context parallelism "
                        f"cuts every sequence into {chunk} equal chunks: use a multiple of {chunk}")
    if m.attention.value != "sdpa":
        problems.append(f"parallel.cp({p.cp}) needs model.attention=sdpa (got "
                        f"{m.attention.value}: megatron's own context parallelism needs "
                        f"Transformer Engine); set model.attention=sdpa or parallel.cp=1")
    if cfg.data.source in (DataSource.digits, DataSource.image_folder):
        problems.append(f"parallel.cp({p.cp}) splits token sequences; data.source="
                        f"{cfg.data.source.value} holds images: use parallel.cp=1")
    return problems


def _experts(cfg: RunConfig, dp: int | None) -> list[str]:
    """Mixture-of-Experts: experts split evenly over ep ranks, ep folded into dp x cp
    (megatron's expert groups), and what megatron's MoE layer needs without TE."""
    p, m = cfg.parallel, cfg.model
    experts = m.num_experts or 0
    problems = _at_least("parallel.ep", p.ep, 1, "set the expert-parallel degree to 1 or more")
    if experts < 0:
        return [*problems, f"model.num_experts({experts}) must be >= 0; use 0 or null for a dense MLP"]
    if not experts:
        if p.ep > 1:
            problems.append(f"parallel.ep({p.ep}) needs model.num_experts > 0 (a dense model has "
                            f"no experts to split); set parallel.ep=1 or model=gpt_moe_tiny")
        return problems
    if p.ep >= 1 and experts % p.ep:
        problems.append(f"parallel.ep: num_experts({experts}) % ep({p.ep}) != 0; choose ep "
                        f"dividing model.num_experts")
    if dp and p.ep >= 1 and (dp * p.cp) % p.ep:
        problems.append(f"parallel.ep: ep({p.ep}) does not divide dp({dp})*cp({p.cp}) (dp = "
                        f"world/(tp({p.tp})*cp({p.cp})*pp({p.pp}))); experts are split over the "
                        f"data-parallel ranks: choose ep dividing {dp * p.cp} or change the world")
    if not 1 <= m.moe_topk <= experts:
        problems.append(f"model.moe_topk({m.moe_topk}) must be in 1..num_experts({experts})")
    if m.bias:
        problems.append("model.bias=true with model.num_experts: megatron's expert MLP adds its "
                        "bias in place (autograd refuses); set model.bias=false")
    if m.moe_capacity_factor is not None and m.moe_capacity_factor <= 0:
        problems.append(f"model.moe_capacity_factor({m.moe_capacity_factor}) must be > 0; or "
                        f"null for no token dropping")
    if p.ep > 1 and cfg.zero.stage == 3:
        problems.append(f"zero.stage(3) with parallel.ep({p.ep}) > 1: DeepSpeed's ZeRO-3 does not "
                        f"take megatron's expert parameters; use zero.stage <= 2 or parallel.ep=1")
    return problems


def _head_field(name: str) -> str:
    return "num_attention_heads" if name == "heads" else name


def _train(t: TrainConfig) -> list[str]:
    return [
        *_at_least("train.steps", t.steps, 1, "train for at least one step"),
        *_at_least("train.log_interval", t.log_interval, 1, "log every step or more"),
        *_at_least("train.eval_interval", t.eval_interval, 0, "use 0 to evaluate only at the end"),
        *_at_least("train.eval_batches", t.eval_batches, 1, "evaluate at least one micro-batch"),
    ]

def _optim(o: OptimConfig, t: TrainConfig) -> list[str]:
    problems = [] if o.lr > 0 else [f"optim.lr({o.lr}) must be > 0; use a positive learning rate such as 1e-3"]
    problems += _at_least("optim.min_lr", o.min_lr, 0, "use a non-negative final learning rate")
    if o.min_lr > o.lr:
        problems.append(f"optim.min_lr({o.min_lr}) > optim.lr({o.lr}); set min_lr <= lr")
    problems += _at_least("optim.grad_clip", o.grad_clip, 0, "use 0 to disable clipping")
    problems += _at_least("optim.weight_decay", o.weight_decay, 0, "use 0 to disable weight decay")
    problems += _at_least("optim.warmup_steps", o.warmup_steps, 0, "use 0 for no warm-up")
    return problems


def clamp_warmup(cfg: RunConfig) -> str | None:
    """A warm-up longer than the run (a smoke run at the default warm-up) becomes the run's
    length: the one-line warning, or None when nothing changed."""
    o, t = cfg.optim, cfg.train
    if t.steps < 1 or o.warmup_steps <= t.steps:
        return None
    note = (f"optim.warmup_steps({o.warmup_steps}) > train.steps({t.steps}): warm-up clamped "
            f"to {t.steps} steps (set optim.warmup_steps<={t.steps} to silence this)")
    o.warmup_steps = t.steps
    return note


def _debug(cfg: RunConfig) -> list[str]:
    """The profiler window and the hang watchdog."""
    p, d = cfg.profile, cfg.debug
    problems = []
    if p.start_step >= 0 and p.end_step <= p.start_step:
        problems.append(f"profile.end_step({p.end_step}) <= profile.start_step({p.start_step}); "
                        f"the window is [start_step, end_step): set profile.end_step="
                        f"{p.start_step + 1} or more (start_step=-1 turns profiling off)")
    if d.hang_timeout_s < 0:
        problems.append(f"debug.hang_timeout_s({d.hang_timeout_s}) < 0; use seconds > 0, "
                        f"or 0 to turn the hang watchdog off")
    return [*problems, *_nsys_window(cfg)]


def _nsys_window(cfg: RunConfig) -> list[str]:
    """nsys records only between the profile window's edges (--capture-range=cudaProfilerApi):
    with no window inside the run every rank would run under nsys and record nothing."""
    p, steps = cfg.profile, cfg.train.steps
    env_on = os.environ.get("MPTK_NSYS", "0") not in ("", "0")
    if not (cfg.cluster.nsys or env_on) or 0 <= p.start_step < steps:
        return []
    who = "cluster.nsys=true" if cfg.cluster.nsys else f"MPTK_NSYS={os.environ['MPTK_NSYS']}"
    window = ("no profile window (profile.start_step < 0)" if p.start_step < 0 else
              f"profile.start_step({p.start_step}) >= train.steps({steps}), a window that never opens")
    return [f"{who} with {window}: nsys captures only that window; set e.g. profile.start_step="
            f"{min(2, steps - 1)} profile.end_step={min(4, steps)}, or cluster.nsys=false"]

def _data(d: DataConfig) -> list[str]:
    problems = []
    if not 0.0 < d.heldout_fraction < 1.0:
        problems.append(
            f"data.heldout_fraction({d.heldout_fraction}) must be in (0, 1); use e.g. 0.02"
        )
    if d.source is DataSource.files and not d.paths:
        problems.append("data.paths is empty with data.source=files; give globs, e.g. 'data.paths=[notes/*.txt]'")
    problems += _at_least("data.max_chars", d.max_chars, 1, "read at least some text")
    return problems

def submitit_job(env: Mapping[str, str]) -> bool:
    """This process is a job of Hydra's submitit launcher (``-m hydra/launcher=submitit_slurm``):
    one Slurm task per sweep point, which spawns the run's ranks itself (mptk's rank runner)."""
    return "SUBMITIT_FOLDER" in env or "SUBMITIT_EXECUTOR" in env


SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
"""submitit's variable naming its checkpoint signal (without ``SIG``); its default is USR2."""


def submitit_signal(env: Mapping[str, str]) -> Optional[signal.Signals]:
    """The signal submitit sends a sweep job ``signal_delay_s`` before its time limit (or on
    preemption) and answers by checkpointing and requeueing the job; None outside such a job
    or when ``SUBMITIT_PREEMPT_SIGNAL`` names no signal (submitit itself refuses that)."""
    if not submitit_job(env):
        return None
    found = getattr(signal, "SIG" + env.get(SUBMITIT_SIGNAL_ENV, "USR2"), None)
    return found if isinstance(found, signal.Signals) else None


def slurm_rank_task(env: Mapping[str, str]) -> bool:
    """This process is one rank started by srun (SLURM_PROCID and a numeric SLURM_STEP_ID), not
    the one task of a submitit sweep job."""
    return ("SLURM_PROCID" in env and env.get("SLURM_STEP_ID", "").isdigit()
            and not submitit_job(env))


def submitit_tasks(env: Mapping[str, str]) -> list[str]:
    """A submitit sweep job runs one task that spawns every rank: more tasks would be more runs
    writing into one run dir."""
    tasks = env.get("SLURM_NTASKS", "1")
    if not submitit_job(env) or not tasks.isdigit() or int(tasks) <= 1:
        return []
    return [f"hydra.launcher: this submitit job has {tasks} Slurm tasks (nodes * tasks_per_node); "
            "each sweep job is one task that spawns launcher.nproc_per_node ranks: set "
            "hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=1 (multi-node runs: mptk-submit)"]


def slurm_world(c: ClusterConfig, world: int, under_slurm: bool | None = None) -> list[str]:
    """Under srun the world Slurm started must be the one ``cluster`` asked for; ``under_slurm``
    defaults to "this process is a Slurm rank task" (:func:`slurm_rank_task`)."""
    if under_slurm is None:
        under_slurm = slurm_rank_task(os.environ)
    expected = c.nodes * c.tasks_per_node
    if not under_slurm or world == expected:
        return []
    return [
        f"cluster: world({world}) != cluster.nodes({c.nodes}) * cluster.tasks_per_node({c.tasks_per_node})"
        f"={expected} under Slurm; submit with mptk-submit (it asks Slurm for exactly that) or set "
        "cluster.nodes and cluster.tasks_per_node to the allocation (sbatch --nodes/--ntasks-per-node)"
    ]

def checkpoint_problems(t: TrainConfig, ep: int = 1) -> list[str]:
    """One line per bad checkpoint setting (``ep``: ``parallel.ep``)."""
    problems = []
    if ep > 1 and not t.save_reshardable_optim:
        problems.append(f"train.save_reshardable_optim=false at parallel.ep={ep}: with experts "
                        f"split over ep ranks optim/ is the only optimizer state a checkpoint "
                        f"has; set train.save_reshardable_optim=true")
    if t.save_interval < -1:
        problems.append(f"train.save_interval({t.save_interval}) < -1; use N>0, 0 "
                        f"(last step only) or -1 (never)")
    if t.keep_last < 0:
        problems.append(f"train.keep_last({t.keep_last}) < 0; use 0 (keep all) or more")
    if not str(t.resume).strip():
        problems.append("train.resume is empty; use auto, none or a checkpoint path")
    return problems
