"""Typed configuration: one dataclass per Hydra group, composed into :class:`RunConfig`.

Every dataclass is ``kw_only`` and ``slots``: an unknown key (``+model.typo=1``) cannot be
silently kept, because a slotted object has no room for it. Choices are Enums, because
OmegaConf rejects ``Literal``. Nothing below the CLI reads a DictConfig: the CLI converts
the composed config to these objects once (see :mod:`mptk.config.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING


class AttentionImpl(Enum):
    """Core attention implementation, chosen through the layer spec."""

    sdpa = "sdpa"
    """``torch.nn.functional.scaled_dot_product_attention`` (flash/memory-efficient kernels)."""
    local = "local"
    """megatron-core's stock ``DotProductAttention`` (baddbmm + softmax)."""


class Normalization(Enum):
    LayerNorm = "LayerNorm"
    RMSNorm = "RMSNorm"


class Activation(Enum):
    gelu = "gelu"
    """Exact (erf) GELU: Hugging Face's ``gelu``."""
    gelu_tanh = "gelu_tanh"
    """GELU's tanh approximation: Hugging Face's ``gelu_new`` / ``gelu_pytorch_tanh`` (GPT-2)."""
    swiglu = "swiglu"


class PositionEmbedding(Enum):
    learned_absolute = "learned_absolute"
    rope = "rope"


class DType(Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Recompute(Enum):
    """Activation recomputation (megatron's ``recompute_granularity``)."""

    none = "none"
    """Keep every activation backward needs."""
    selective = "selective"
    """Recompute core attention in backward (megatron's ``core_attn``): drops the
    sequence-squared attention terms (Korthikanti et al. 2022) for a few percent more FLOPs."""
    full = "full"
    """Keep only each recomputed layer's input and rerun its forward in backward: the most
    memory saved, one extra forward of those layers (~33% more FLOPs)."""


class RecomputeMethod(Enum):
    """Which layers ``train.recompute=full`` recomputes (megatron's ``recompute_method``)."""

    uniform = "uniform"
    """Split each stage's layers into groups of ``train.recompute_layers`` and checkpoint each
    group's input."""
    block = "block"
    """Recompute only the first ``train.recompute_layers`` layers of each stage; the rest keep
    their activations (trade memory for speed per layer)."""


class Device(Enum):
    auto = "auto"
    """CUDA when a GPU is visible, else CPU."""
    cpu = "cpu"
    cuda = "cuda"


class Backend(Enum):
    auto = "auto"
    """nccl on CUDA, gloo on CPU."""
    gloo = "gloo"
    nccl = "nccl"


class OptimizerName(Enum):
    adamw = "adamw"
    sgd = "sgd"


class LRSchedule(Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DataSource(Enum):
    stdlib = "stdlib"
    """The ``.py`` files of Python's own standard library: real text on every machine."""
    files = "files"
    """Plain-text files matched by ``data.paths`` (globs)."""
    indexed = "indexed"
    """megatron-core indexed datasets (``.bin``/``.idx``) blended by ``data.blend``."""
    digits = "digits"
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download)."""
    image_folder = "image_folder"
    """Images under ``data.image_root``, one sub-folder per class (read with PIL)."""


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Fields every recipe's model config has; a recipe derives its own schema from this."""

    recipe: str = MISSING
    """Name of the recipe in the registry that builds this model (e.g. ``gpt``)."""
    num_layers: int = 2
    """Transformer layers."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Attention heads; must divide by ``parallel.tp``."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; ``None`` means multi-head attention."""
    ffn_hidden_size: Optional[int] = None
    """MLP width; ``None`` means 4 x hidden_size."""
    seq_length: int = 128
    """Tokens (or patches) per sample."""
    attention: AttentionImpl = AttentionImpl.sdpa
    """Core attention implementation swapped in through the layer spec."""
    normalization: Normalization = Normalization.LayerNorm
    """Norm layer type."""
    activation: Activation = Activation.gelu
    """MLP activation; ``swiglu`` uses a gated MLP."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    bias: bool = True
    """Biases in the attention and MLP linear layers (megatron's ``add_bias_linear``; GPT-2 has
    them, Llama not)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norm layers (GPT-2 1e-5; Llama checkpoints often 1e-6)."""
    num_experts: Optional[int] = None
    """Mixture-of-Experts: experts per MLP (megatron's ``num_moe_experts``); ``None`` or 0 =
    a dense MLP. Experts are split over ``parallel.ep`` ranks."""
    moe_topk: int = 2
    """Experts each token is routed to (``moe_router_topk``)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each expert's MLP; ``None`` = ``ffn_hidden_size`` (4 x hidden_size)."""
    moe_aux_loss_coeff: float = 0.01
    """Weight of the load-balancing (switch) auxiliary loss added to the training loss."""
    moe_capacity_factor: Optional[float] = None
    """Expert capacity as a multiple of the balanced load: tokens beyond it are dropped;
    ``None`` = no dropping."""
    moe_shared_expert_hidden_size: Optional[int] = None
    """Width of a shared expert every token also goes through; ``None`` = none."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """Model-parallel layout. ``dp`` is derived: world / (tp * cp * pp)."""

    tp: int = 1
    """Tensor-parallel degree (megatron-core ``tensor_model_parallel_size``)."""
    pp: int = 1
    """Pipeline-parallel degree (megatron-core ``pipeline_model_parallel_size``)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages (model chunks) per pp rank: the interleaved 1F1B schedule.
    ``None`` or 1 means plain 1F1B."""
    layers_per_stage: Any = "auto"
    """Transformer layers per pipeline stage: ``auto`` (balanced by a cost model that charges the
    embedding to the first stage and the output layer + loss to the last), or a list of
    pp * vpp counts in virtual-stage order (chunk 0 of every rank, then chunk 1, ...)."""
    sp: bool = False
    """Sequence parallelism (needs tp > 1): norms, dropouts and residuals work on 1/tp of the
    sequence, so their activations shrink by tp; the tp all-reduces become reduce-scatter +
    all-gather pairs (same bytes). The norms' gradients are summed over the tp group. On for
    a MoE model (``model.num_experts``) at tp > 1: megatron's MoE layer requires it."""
    cp: int = 1
    """Context parallelism: every sequence split over cp ranks (DeepSpeed-Ulysses all-to-all
    around the SDPA core attention; needs heads/tp and query groups/tp divisible by cp and
    model.seq_length by 2*cp). Gradients are reduced over dp x cp; cp peers read the same
    samples, each its own part of the sequence."""
    ep: int = 1
    """Expert parallelism (``model.num_experts`` > 0): the experts of every MoE layer split over
    ep ranks, tokens exchanged by all-to-all. ep folds into dp x cp (megatron's
    ``expert_model_parallel_size``): dense gradients are reduced over dp x cp, expert ones over
    the ranks holding the same experts (dp x cp / ep)."""


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    """DeepSpeed ZeRO settings; turned into the DeepSpeed config dict in one place."""

    stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters on the CPU."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per reduction bucket."""
    stage3_param_persistence_threshold: int = 0
    """ZeRO-3: parameters smaller than this stay unpartitioned (0 = partition all)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form DeepSpeed config merged last (recursively) over the generated one."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: OptimizerName = OptimizerName.adamw
    """Optimizer (torch implementation, handed to DeepSpeed)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    beta1: float = 0.9
    """Adam beta1 (SGD momentum)."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    schedule: LRSchedule = LRSchedule.cosine
    """Decay after warm-up, down to ``min_lr`` at ``train.steps``."""
    foreach: Optional[bool] = None
    """torch's multi-tensor (``foreach``) optimizer kernels; ``None`` = torch's default (on for
    CUDA tensors, off on the CPU). Same numbers as the per-parameter loop."""
    fused: Optional[bool] = None
    """torch's fused AdamW/SGD kernel (one launch for all parameters, CUDA and CPU); ``None`` =
    torch's default (off). DeepSpeed takes it as a plain torch optimizer: no JIT build."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the training text comes from and how it is tokenized."""

    source: DataSource = DataSource.stdlib
    """Text source."""
    paths: list[str] = field(default_factory=list)
    """Globs of text files when ``source=files``."""
    cache_dir: str = "~/.cache/mptk"
    """Tokenizer and token caches, reused across runs."""
    max_chars: int = 8_000_000
    """Upper bound on characters of text read (keeps the first tokenization short)."""
    heldout_fraction: float = 0.02
    """Fraction of documents (or images) held out for evaluation."""
    image_root: str = ""
    """Folder of class sub-folders when ``source=image_folder``."""
    tokenizer: str = ""
    """A ``tokenizer.json`` or Hugging Face tokenizer folder to tokenize the text with instead
    of training mptk's byte-level BPE on it (its vocabulary must fit ``model.vocab_size``).
    Empty with ``train.init_from=hf:DIR``: DIR's tokenizer, so fine-tuning reads the text as
    the pretrained model does."""
    blend: list[Any] = field(default_factory=list)
    """``source=indexed``: ``[weight, prefix, ...]``, ``[prefix, ...]`` or
    ``[{path: prefix, weight: w}, ...]``; empty = the stdlib corpus as .bin/.idx in cache_dir."""
    split: list[float] = field(default_factory=lambda: [98.0, 2.0, 0.0])
    """``source=indexed``: train, valid, test shares of each prefix's documents
    (``[969,30,1]`` adds a test split; each share must get at least one document)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Samples per forward pass per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all ranks = micro * grad_acc * dp."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    dtype: DType = DType.fp32
    """Parameter / compute dtype."""
    device: Device = Device.auto
    """Where to run."""
    log_interval: int = 10
    """Steps between metric lines."""
    eval_interval: int = 50
    """Steps between held-out evaluations (0 = only at the end)."""
    eval_batches: int = 4
    """Micro-batches per evaluation."""
    save_interval: int = 0
    """Steps between checkpoints in ``run_dir/checkpoints``; 0 = only at the last step,
    -1 = never periodically nor at the end. SIGTERM/SIGUSR1 always save (then exit 3)."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted); 0 = keep all."""
    save_reshardable_optim: bool = True
    """Every checkpoint also writes the optimizer state layout-free (``optim/``): the state a
    resume at another tp/pp/dp/cp/ZeRO layout loads. It costs per save the fp32 master and
    moments of every parameter once more on disk (12 bytes per parameter with AdamW), this
    rank's tp x pp shard of them held in CPU memory and three dp all-reduces of it (all-gathers
    at ZeRO-3: the save's memory peak on a large model). ``false`` saves all that; such
    checkpoints resume exactly at their own layout only (DeepSpeed's copy) and preflight
    refuses one at another layout. Must stay true at ``parallel.ep>1``, where it is the only
    optimizer state saved."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint in ``run_dir/checkpoints`` if
    any; ``none``: start fresh; a path (checkpoint, checkpoints dir or run dir): continue
    from it (same tp/pp/dp/ZeRO layout) unless this run dir already has its own checkpoints."""
    init_from: Optional[str] = None
    """Path of a checkpoint whose weights start this run (any tp/pp layout; fresh optimizer,
    step 0), e.g. for fine-tuning; ignored once this run dir has its own checkpoints.
    ``hf:DIR``: a Hugging Face Llama or GPT-2 folder (``model.*`` must match its config.json:
    preflight prints the override for each field that differs)."""
    compile: bool = False
    """``torch.compile`` each megatron transformer layer in place (parameter names
    and checkpoints unchanged; one graph shared by all layers). The first step pays the
    compilation; under ZeRO-3 the parameter hooks split the graph. On the CPU inductor needs a
    C++ compiler."""
    compile_loss: bool = False
    """``torch.compile`` a GPT's cross-entropy over the logits too. Same losses; on
    the CPU it was slower and took more memory than eager, on a GPU it is unmeasured."""
    recompute: Recompute = Recompute.none
    """Activation recomputation, same losses either way. ``none``: every layer keeps
    s*b*h*(34 + 5*a*s/h) bytes (16-bit; /tp for the split part). ``selective``: core attention
    (scores, softmax, attention dropout) reruns in backward: saves the 5*a*s/h term, costs a few
    % more FLOPs (with ``model.attention=sdpa`` no score matrix is kept, so it saves nothing
    there). ``full``: a recomputed layer keeps only its input (2*s*b*h) and reruns its
    forward in backward: ~33% more FLOPs, plus one rebuilt layer's activations at the backward
    peak. ``mptk-plan`` shows both; measured in docs/memory_levers.md."""
    recompute_method: RecomputeMethod = RecomputeMethod.uniform
    """With ``recompute=full``: ``uniform`` (every layer, checkpointed in groups of
    ``recompute_layers``: least memory) or ``block`` (only the first ``recompute_layers`` layers
    of each stage: the others keep their activations and cost no extra forward)."""
    recompute_layers: int = 1
    """With ``recompute=full``: megatron's ``recompute_num_layers`` (group size for uniform:
    larger groups keep fewer inputs but rebuild more at once in backward; layers per stage for
    block: more layers save more memory and cost more FLOPs)."""


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """Weights & Biases logging."""

    mode: WandbMode = WandbMode.offline
    """offline writes under the run dir (``wandb sync`` later); online needs a login."""
    project: str = "mptk"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    name: Optional[str] = None
    """Run name; defaults to the run dir's name."""


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """Metrics output."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B settings."""
    progress: bool = True
    """A ``rich`` progress bar with ETA on rank 0's console when it is a terminal."""
    phase_timers: bool = True
    """Per-phase step times with min/max over ranks and the straggler at each log step (one
    small all-gather per log interval)."""
    tensorboard: bool = False
    """Also write every metrics row as TensorBoard scalars under ``run_dir/tensorboard/`` (rank
    0; the keys of ``metrics.jsonl``): ``tensorboard --logdir <run dir>``."""


@dataclass(kw_only=True, slots=True)
class LauncherConfig:
    """How workers start when ``mptk-train`` is not already under torchrun or srun."""

    nproc_per_node: int = 1
    """Local workers to spawn when started bare."""
    backend: Backend = Backend.auto
    """torch.distributed backend."""
    master_addr: str = "127.0.0.1"
    """Rendezvous address for local spawn."""
    master_port: int = 0
    """Rendezvous port for local spawn (0 = pick a free one)."""


class Fabric(Enum):
    """The network between nodes; picks which NCCL/UCX variables a cluster profile sets."""

    infiniband = "infiniband"
    """Native InfiniBand (verbs, GID 0)."""
    roce = "roce"
    """RDMA over Converged Ethernet (verbs over Ethernet; needs a RoCEv2 GID index)."""
    ethernet = "ethernet"
    """TCP sockets only (no RDMA)."""
    local = "local"
    """One machine: loopback, CPU tasks on gloo."""


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """A Slurm cluster profile: the allocation ``mptk-submit`` asks for and the fabric variables
    every task gets. Rendered into an sbatch script by :mod:`mptk.launch.slurm`."""

    fabric: Fabric = Fabric.local
    """Inter-node network; documents which ``env`` the profile sets."""
    nodes: int = 1
    """Nodes (``--nodes``)."""
    tasks_per_node: int = 1
    """Tasks per node (``--ntasks-per-node``): one training process per GPU, started by srun."""
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node``); 0 = CPU tasks; else must equal ``tasks_per_node``."""
    gpu: Optional[str] = None
    """GPU type for mptk-plan and the memory check (h100, h200, a100, ...); None = unchecked."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None = from ``gpu`` or the CUDA device name."""
    cpus_per_task: int = 1
    """CPU cores per task (``--cpus-per-task``): data loading and host-side work."""
    mem: Optional[str] = None
    """Memory per node (``--mem``, e.g. ``0`` = all of it); ``None`` = the partition's default."""
    partition: Optional[str] = None
    """Slurm partition (``--partition``); ``None`` = the cluster's default."""
    account: Optional[str] = None
    """Account charged (``--account``); ``None`` = the user's default."""
    qos: Optional[str] = None
    """Quality of service (``--qos``); ``None`` = the default."""
    time: str = "01:00:00"
    """Wall-clock limit (``--time``, ``[D-]HH:MM:SS``)."""
    exclusive: bool = False
    """Whole nodes only (``--exclusive``): no other job shares the NICs and GPUs."""
    job_name: str = "mptk"
    """Job name (``--job-name``)."""
    container_image: Optional[str] = None
    """pyxis/enroot image for ``srun --container-image``; ``None`` = run on the host."""
    container_mounts: list[str] = field(default_factory=list)
    """``src:dst`` mounts for ``srun --container-mounts`` (the submit dir is always mounted)."""
    signal_grace_s: int = 120
    """Seconds before the time limit when Slurm sends SIGUSR1 (``--signal=USR1@N``) so the
    training can save and exit with the requeue code."""
    requeue_max: int = 3
    """Times the job may be requeued (after a save on SIGUSR1 or a preemption); 0 = never."""
    exit_wait_s: int = 60
    """``srun --wait``: once one task has exited, end the others after this many seconds
    (a dead rank otherwise leaves the rest blocked in a collective)."""
    env: dict[str, str] = field(default_factory=dict)
    """Fabric variables exported to every task (NCCL_*, UCX_*, GLOO_*, OMP_NUM_THREADS)."""
    debug: bool = False
    """Also export ``debug_env``: the switches for diagnosing hangs."""
    debug_env: dict[str, str] = field(default_factory=dict)
    """Hang-diagnosis variables (NCCL_DEBUG=INFO, desync debug), off by default (the flight
    recorder's variables are set by every script and the local launcher)."""
    nsys: bool = False
    """Run every task under ``nsys profile --capture-range=cudaProfilerApi``: one report per rank
    in ``run_dir/nsys/``, covering exactly the ``profile.start_step..end_step`` window
    (``MPTK_NSYS=1`` in the job's environment does the same for the checked-in scripts)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before srun (``module load ...``, ``source venv``)."""
    sbatch_extra: list[str] = field(default_factory=list)
    """Further sbatch options, one per ``#SBATCH`` line (e.g. ``--constraint=h100``)."""


class NanPolicy(Enum):
    """What a rank does when the loss or the gradient norm is NaN or infinite."""

    stop = "stop"
    """Log the rank and step, then exit non-zero (every rank sees the same dp-averaged loss)."""
    skip = "skip"
    """Log the rank and step and keep training."""


@dataclass(kw_only=True, slots=True)
class DebugConfig:
    """Run-time health checks (see docs/observability.md)."""

    nan_policy: NanPolicy = NanPolicy.stop
    """Reaction to a non-finite loss or gradient norm, checked every step."""
    nan_dump: bool = True
    """On a non-finite loss or norm, every rank appends the step's global sample ids of its
    micro-batches to ``run_dir/nan/rank_<r>.json`` (to replay the offending batch)."""
    hang_timeout_s: float = 1800.0
    """Seconds without a completed step (eval and checkpoint saves included) before every rank
    dumps its Python stacks to ``run_dir/hang/rank_<r>.txt`` and exits non-zero; 0 = off."""
    memory_snapshot: bool = False
    """CUDA only: record the caching allocator's history (``torch.cuda.memory``) for the first
    ``memory_snapshot_steps`` steps of the run and dump ``run_dir/memory/rank<r>_step<n>.pickle``
    (open it in https://pytorch.org/memory_viz) at the window's end, and on an out-of-memory
    error. On CPU a note says it is CUDA-only."""
    memory_snapshot_steps: int = 3
    """Steps recorded from the run's first one (the first steps allocate the optimizer state
    and reach the peak); 0 = until the end of the run."""


@dataclass(kw_only=True, slots=True)
class ProfileConfig:
    """A torch.profiler window: one Chrome trace per rank in ``run_dir/profile/``."""

    start_step: int = -1
    """First profiled optimizer step (0-based); negative = profiling off."""
    end_step: int = -1
    """Step at which the window closes (exclusive)."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that profile."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """One training run: every group, composed by Hydra and converted once at the CLI."""

    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Slurm profile: allocation and fabric variables (used by ``mptk-submit`` and preflight)."""
    run_dir: str = "."
    """Where this run writes; set by the CLI from Hydra's run dir."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """NaN/Inf policy and hang watchdog."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler window."""
