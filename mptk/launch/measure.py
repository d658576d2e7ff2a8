"""Calibration: build the DeepSpeed engine of a layout, run steps, and count the model-state
bytes each rank actually holds, beside the planner's prediction.

What is counted (unique tensor storages, so views into DeepSpeed's flat buffers count once,
padding included):

- params: the working-precision parameters (ZeRO-3: the rank's ``ds_tensor`` partitions);
- grads (bytes of the gradient tensors themselves): ZeRO-0 the module gradients at the
  optimizer step; ZeRO-1 the module gradients when the boundary's reduction starts (ZeRO-1
  keeps full gradients); ZeRO-2 the fp32 gradient partition DeepSpeed hands the optimizer
  (``single_partition_of_fp32_groups[i].grad``, summed over groups; it can be a view into the
  ``grads_in_partition`` staging buffer, which is not counted); ZeRO-3 the gradient
  partition buffer (``grad_partitions_flat_buffer``);
- master: fp32 copies the torch optimizer updates that are not the module's parameters
  (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``);
- optim: every tensor in the torch optimizer's ``state`` (moments, ``step`` scalars).

DeepSpeed's transient buffers (gradient buckets, ZeRO-2's ``grads_in_partition`` staging) are
not model states and are not counted here. Only pp=1 layouts and the GPT/ViT recipes. Runs
where training would (CPU with gloo, or the GPU with NCCL: ``train.device``), each rank a
process of :func:`mptk.launch.runner.run`.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from typing import Any

import torch

from mptk.config import registry
from mptk.launch import runner
from mptk.plan.cost import shape_of, stage_tensors
from mptk.plan.memory import model_states, training_of

STAGES = (0, 1, 2, 3)


# --------------------------------------------------------------------------- prediction


def predicted(cfg, tp: int, dp: int, stage: int) -> dict[str, float]:
    """The planner's model-state bytes for one rank of a pp=1 layout, by the measured
    definitions: at ZeRO-2 a 16-bit run's optimizer steps on an fp32 copy of the gradient
    partition, which the planner books under buffers (the ZeRO paper's 2 bytes stay the
    gradient): it is moved back to gradients here."""
    sh, tr = shape_of(cfg.model), training_of(cfg)
    tensors = stage_tensors(sh, tp, sh.layers, True, True, 1)
    states = model_states(tensors, dp, stage, tr)
    if stage == 2 and tr.w < 4:
        states.grads *= 4 / tr.w
    return states.as_dict()


# --------------------------------------------------------------------------- counting


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (meta and empty ones skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta" or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class Probe:
    """Hooks that record gradient storages at the moments DeepSpeed holds them."""

    def __init__(self, engine):
        self.engine, self.inner = engine, torch_optimizer(engine)
        self.active, self.step_grads, self.module_grads, self.pre_reduce = False, {}, {}, {}
        self._step = self.inner.step
        self.inner.step = self._wrapped_step  # type: ignore[method-assign]  # patched on purpose, undone by remove()
        zero = engine.optimizer
        self._reduce: Any = getattr(zero, "reduce_gradients", None)
        if self._reduce is not None:
            zero.reduce_gradients = self._wrapped_reduce

    def _grads(self, params) -> dict[tuple[int, int], int]:
        """Bytes of each gradient tensor (not its storage: DeepSpeed may hand the optimizer a
        partition that is a view into a larger staging buffer)."""
        grads = [p.grad for p in params if p.grad is not None]
        return {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in grads
                if t.device.type != "meta" and t.numel()}

    def _wrapped_step(self, *args, **kwargs):
        out = self._step(*args, **kwargs)
        if self.active:
            params = [p for g in self.inner.param_groups for p in g["params"]]
            self.step_grads.update(self._grads(params))
            self.module_grads.update(self._grads(self.engine.module.parameters()))
        return out

    def _wrapped_reduce(self, *args, **kwargs):
        if self.active:
            self.pre_reduce.update(self._grads(self.engine.module.parameters()))
        return self._reduce(*args, **kwargs)

    def remove(self) -> None:
        """Put the optimizer's own methods back."""
        self.inner.step = self._step  # type: ignore[method-assign]  # restores the original
        if self._reduce is not None:
            self.engine.optimizer.reduce_gradients = self._reduce


def _params(engine, stage: int) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    return [p.ds_tensor for p in params] if stage == 3 else params


def _grads(probe: Probe, stage: int) -> int:
    if stage == 3:
        return storage_bytes([probe.engine.optimizer.grad_partitions_flat_buffer])
    chosen = {0: probe.module_grads, 1: probe.pre_reduce, 2: probe.step_grads}[stage]
    return sum(chosen.values())


def _masters(probe: Probe, stage: int) -> list[torch.Tensor]:
    """The tensors the torch optimizer updates (DeepSpeed empties its param groups between
    ZeRO-3 sub-group steps, so they are read from DeepSpeed's own lists)."""
    zero = probe.engine.optimizer
    if stage == 3:
        return list(zero.fp32_partitioned_groups_flat)
    if stage in (1, 2):
        return list(zero.single_partition_of_fp32_groups)
    return [p for g in probe.inner.param_groups for p in g["params"]]


def held(probe: Probe, stage: int) -> dict[str, float]:
    """Model-state bytes this rank holds (see the module docstring)."""
    own = _params(probe.engine, stage)
    own_ptrs = {p.untyped_storage().data_ptr() for p in own if p.numel()}
    master = [p for p in _masters(probe, stage)
              if p.numel() and p.untyped_storage().data_ptr() not in own_ptrs]
    states = [v for s in probe.inner.state.values() for v in s.values() if torch.is_tensor(v)]
    out = {"params": storage_bytes(own), "grads": _grads(probe, stage),
           "master": storage_bytes(master), "optim": storage_bytes(states)}
    return {**out, "total": sum(out.values())}


# --------------------------------------------------------------------------- running


def synthetic_batch(cfg, generator: torch.Generator) -> dict:
    """A random micro-batch of the recipe's inputs (no data files needed)."""
    recipe = registry.get(cfg.model.recipe)
    if recipe.example_batch is None:
        raise ValueError(f"model.recipe={recipe.name!r} gives no example_batch; mptk-plan --measure "
                         f"needs one (add example_batch= to the recipe)")
    return recipe.example_batch(cfg.model, cfg.train.micro_batch_size, generator)


def _train(engine, recipe, cfg, probe: Probe, grad_acc: int, steps: int, device) -> None:
    """``steps`` optimizer steps; the probe records during the last one."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    for step in range(steps):
        probe.active = step == steps - 1
        for _ in range(grad_acc):
            batch = {k: v.to(device) for k, v in synthetic_batch(cfg, generator).items()}
            loss, _ = recipe.loss(engine, batch)
            engine.backward(loss)
            engine.step()


def measure_stage(cfg, layout, stage: int, steps: int = 1, device: torch.device | None = None,
                  backend: str = "gloo") -> dict:
    """One engine at ZeRO ``stage`` on this rank (on ``device``, the CPU by default):
    predicted and measured bytes."""
    device = device if device is not None else torch.device("cpu")
    from mptk.config import registry
    from mptk.engine import deepspeed as ds
    from mptk.train.loop import build_model

    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = copy.deepcopy(cfg)
    cfg.zero.stage = stage
    recipe = registry.get(cfg.model.recipe)
    model = build_model(recipe, cfg, layout, device, backend)
    engine = ds.initialize(model, cfg, layout)
    probe = Probe(engine)
    _train(engine, recipe, cfg, probe, layout.grad_acc, steps, device)
    measured = held(probe, stage)
    probe.remove()
    del engine, probe
    gc.collect()
    out = row(cfg, layout, stage, predicted(cfg, layout.tp, layout.dp, stage), measured)
    return {**out, **_device_peak(device), "seconds": round(time.perf_counter() - start, 2)}


def _device_peak(device) -> dict:
    """On a GPU: the allocator's peak during this stage (activations and buffers included)."""
    if device.type != "cuda":
        return {"device": device.type}
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {"device": torch.cuda.get_device_name(device), "cuda_max_allocated": peak}


def row(cfg, layout, stage: int, pred: dict, meas: dict) -> dict:
    """One JSON row: layout, predicted and measured bytes, relative error of the total."""
    from mptk.parallel import groups

    err = abs(pred["total"] - meas["total"]) / max(meas["total"], 1)
    return {"rank": groups.rank(), "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
            "zero": stage, "dtype": cfg.train.dtype.value, "optimizer": cfg.optim.name.value,
            "predicted": pred, "measured": meas, "exact": pred == meas, "rel_err": err}


def measure_rank(env, cfg, stages=STAGES, steps: int = 1) -> list[dict]:
    """Entry of one rank (the target of :func:`run`, and of ``tests/spawn/harness.run_world``):
    groups once, then an engine per ZeRO stage, one after the other."""
    from mptk.log.noise import quiet
    from mptk.parallel import groups
    from mptk.train.preflight import preflight

    quiet()
    layout = preflight(cfg, env.world_size, torch.cuda.is_available())
    device = groups.resolve_device(cfg.train.device)
    backend = groups.resolve_backend(cfg.launcher.backend, device)
    groups.init(env, layout.tp, layout.pp, device, backend, cfg.train.seed,
                getattr(layout, "vpp", None))
    return [measure_stage(cfg, layout, stage, steps, device, backend) for stage in stages]


def run(cfg, world: int, stages=STAGES, steps: int = 1) -> list[dict]:
    """Spawn ``world`` local ranks, measure every stage, return all ranks' rows (a failing
    rank raises :class:`mptk.launch.runner.RankError`)."""
    per_rank = runner.run(measure_rank, world, cfg, tuple(stages), steps)
    return [r for rows in per_rank for r in rows]


def write_rows(rows: list[dict], path: str) -> None:
    """Append rows to a JSON-lines file."""
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
