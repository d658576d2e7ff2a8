"""DeepSpeed owns data parallelism, ZeRO and the optimizer: its config is generated here,
from the typed ``zero``/``optim``/``train`` groups, in one place.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mptk.config.schema import DType, LRSchedule, OptimizerName, RunConfig
from mptk.parallel.layout import Layout


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge, ``extra`` winning."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        out[key] = value
    return out


def zero_section(cfg: RunConfig) -> dict[str, Any]:
    zero = cfg.zero
    section: dict[str, Any] = {
        "stage": zero.stage, "overlap_comm": zero.overlap_comm, "contiguous_gradients": True,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.reduce_bucket_size,
    }
    if zero.stage == 3:
        section["stage3_param_persistence_threshold"] = zero.stage3_param_persistence_threshold
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": False}
    return section


def ds_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed config dict; ``zero.extra`` is merged last."""
    train, piped = cfg.train, layout.pp > 1
    config = {
        # DeepSpeed's data-parallel world is dp x cp (the mpu adapter): cp peers count as
        # replicas there, each "sample" being one part of a sequence.
        "train_batch_size": train.global_batch_size * layout.cp,
        # pp>1: megatron's schedule runs the micro-batches; DeepSpeed sees one "micro-batch"
        # covering them all, so every step is an accumulation boundary.
        "train_micro_batch_size_per_gpu": train.micro_batch_size * (layout.grad_acc if piped else 1),
        "gradient_accumulation_steps": 1 if piped else layout.grad_acc,
        # DeepSpeed 0.19.8 defaults to 1.0, which would silently clip every step. At pp>1 and
        # ZeRO-0 mptk clips itself (mptk/train/pipeline.py) with a norm over tp x pp, and at
        # ZeRO-0 with experts (mptk/train/step.py) with a norm over the ep peers' experts too.
        "gradient_clipping": 0.0 if mptk_clips(cfg, layout) else cfg.optim.grad_clip,
        "zero_optimization": zero_section(cfg),
        "bf16": {"enabled": train.dtype is DType.bf16},
        "fp16": {"enabled": train.dtype is DType.fp16},
        # The optimizer is a torch one (no JIT build); allow it under ZeRO and offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.zero.extra)


def mptk_clips(cfg: RunConfig, layout: Layout) -> bool:
    """ZeRO-0 at pp>1 or with experts split over ep: mptk clips (DeepSpeed's ZeRO-0 clipping
    averages per-rank norms over dp, and those differ where ranks hold different experts)."""
    return cfg.zero.stage == 0 and (layout.pp > 1 or layout.ep > 1)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases and norm weights)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    from mptk.engine import experts

    return experts.split_groups([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}])


def optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """A torch optimizer handed to DeepSpeed (no fused/CPU-Adam JIT build); ``optim.foreach``
    and ``optim.fused`` pick torch's multi-tensor or fused kernels."""
    opt, groups = cfg.optim, param_groups(model, cfg.optim.weight_decay)
    kernels: dict[str, Any] = {"foreach": opt.foreach, "fused": opt.fused}
    if opt.name is OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.beta1, **kernels)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                             **kernels)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Multiplier of ``optim.lr`` at ``step``: linear warm-up, then decay to ``min_lr``."""
    opt, total = cfg.optim, cfg.train.steps
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule is LRSchedule.constant:
        return 1.0
    progress = min(1.0, (step - opt.warmup_steps) / max(1, total - opt.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if opt.schedule is LRSchedule.cosine \
        else 1.0 - progress
    floor = opt.min_lr / opt.lr
    return floor + (1 - floor) * shape


def disable_jit_probes() -> None:
    """DeepSpeed probes (compiles) every op on first access of ``__compatible_ops__``, and
    builds its shm comm op at comm init though training never uses it: answer 'none'."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}


def initialize(model: torch.nn.Module, cfg: RunConfig, layout: Layout):
    """``deepspeed.initialize`` with the mpu adapter over megatron's groups (after the tp sum of
    the sequence-parallel norm gradients is hooked in: DeepSpeed reduces over dp only)."""
    disable_jit_probes()
    import deepspeed

    from mptk.engine import experts, grads
    from mptk.parallel import groups
    from mptk.parallel.mpu import MegatronMpu, mark_parameters

    grads.sum_over_tp(model, groups.tp_group(), layout.tp)
    if layout.ep > 1:  # expert gradients over the expert-data-parallel group (DeepSpeed's MoE path)
        experts.bridge(model, layout.ep, groups.ep_group(), groups.expert_dp_group())
    mark_parameters(model)
    opt = optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=scheduler, mpu=MegatronMpu(),
        config=ds_config(cfg, layout), dist_init_required=False)
    return engine
