"""The optimizer state of a checkpoint written layout-independently, so a run resumes with it at
another tp/pp/vpp/dp/cp layout and ZeRO stage.

Each parameter's full fp32 master and optimizer moments (Adam's ``exp_avg``/``exp_avg_sq``,
SGD's ``momentum_buffer``) are assembled out of DeepSpeed's dp partitions
(``deepspeed.utils.safe_get_full_*``: a dp all-reduce at ZeRO 1/2 and bf16, an all-gather at
ZeRO-3; at ZeRO-0 fp32 the parameter is its own master and the torch optimizer holds the
moments), then written through megatron dist-checkpointing under the parameter's own global key
and tp/pp sharding, prefixed ``optim.<state>.``: the same keys the weights use, so they load at
any layout the weights load at. The step count is common state.

On load the moments and masters go back through the ``safe_set_full_*`` counterparts, which
write only this rank's partition. DeepSpeed creates optimizer state at the first step, so it is
created here first (zero moments, the saved step) and DeepSpeed's fragments linked to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from mptk.checkpoint.format import OPTIM, CheckpointError

MASTER = "fp32_param"
"""The state name of the fp32 master weights."""


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update: under DeepSpeed's ZeRO/bf16 wrapper, or the
    engine's own (ZeRO-0 fp32)."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else engine.optimizer


def moment_keys(base: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state tensors of ``base`` besides the step."""
    if isinstance(base, torch.optim.SGD):
        return ("momentum_buffer",) if any(g["momentum"] for g in base.param_groups) else ()
    if isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        if any(g.get("amsgrad") for g in base.param_groups):
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")
    raise CheckpointError(f"optimizer {type(base).__name__}: its state is not reshardable here; "
                          f"use optim.name=adamw or sgd")


def saved_step(base: torch.optim.Optimizer) -> Optional[float]:
    """The optimizer's own step count (Adam's bias correction), None for SGD."""
    for st in base.state.values():
        if "step" in st:
            return float(st["step"])
    return None


def link_fragments(engine) -> None:
    """Point DeepSpeed's per-parameter fragments at the optimizer state as it is now. ZeRO 1/2
    (0.19.8) links them once, right after stepping the *first* param group: a later group's
    state does not exist yet, so its parameters stay unlinked (no ``exp_avg`` fragment)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _gathered(chunks: list[torch.nn.Module]):
    """ZeRO-3 holds parameter partitions: gather them while the sharding is read."""
    params = [p for c in chunks for p in c.parameters()]
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _param_shards(chunks: list[torch.nn.Module]) -> dict[int, Any]:
    """Parameter id -> its ShardedTensor (or factory) in megatron's sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
    from megatron.core.transformer.utils import sharded_state_dict_default

    with _gathered(chunks):
        sharded = {f"chunk{i}": sharded_state_dict_default(c, prefix="", metadata={})
                   for i, c in enumerate(chunks)}
    tensors, _ = extract_sharded_tensors_and_factories(sharded)
    return {id(t.data): t for t in nested_values(tensors)}


def _trained(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The trained parameters in one fixed order (the same on every dp rank: the getters are
    collectives over dp)."""
    for i, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                yield f"chunk{i}.{name}", param


def _shape(param: torch.nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def full_value(param: torch.nn.Parameter, key: str, base: torch.optim.Optimizer) -> torch.Tensor:
    """The full (all dp partitions) fp32 ``key`` state of ``param`` (a collective over dp)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if key == MASTER:
        got = safe_get_full_fp32_param(param)
        got = param.detach().float() if got is None else got
    else:
        got = safe_get_full_optimizer_state(param, key)
        # torch keeps no state for a parameter that never had a gradient: zero moments
        got = base.state[param].get(key, torch.zeros_like(param)) if got is None else got
    return got.detach().reshape(_shape(param)).float().cpu()


def set_value(param: torch.nn.Parameter, key: str, value: torch.Tensor,
              base: torch.optim.Optimizer) -> None:
    """Put the full ``value`` of ``key`` back: DeepSpeed keeps this rank's partition of it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds = hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")
    if key == MASTER:
        if ds:
            safe_set_full_fp32_param(param, value.to(param.device))
        else:
            with torch.no_grad():
                param.copy_(value)
    elif ds:
        safe_set_full_optimizer_state(param, value.to(param.device), key)
    else:
        base.state[param][key] = value.to(param.device).clone()


def _sharded(chunks, values_of) -> dict:
    """``optim.<key>.<global key>`` ShardedTensors with the parameters' sharding; the data of
    each is ``values_of(name, param, key)``. A parameter megatron does not shard is left out."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    shards, out = _param_shards(chunks), {}
    for name, param in _trained(chunks):
        for key, value in values_of(param):
            if id(param) in shards:
                out[f"{key}/{name}"] = make_sharded_optimizer_tensor(
                    shards[id(param)], value, prefix=f"{OPTIM}.{key}")
    return out


def has_state(engine, base: torch.optim.Optimizer) -> bool:
    """Whether the optimizer has taken a step (torch and DeepSpeed create state at the first)."""
    return any(base.state.get(t) for t in state_tensors(engine, base))


def save(engine, chunks: list[torch.nn.Module], folder: Path) -> None:
    """The optimizer state of this rank's ``chunks`` into ``folder`` (a collective). Before the
    first step the moments are the zeros torch would create at it."""
    from megatron.core import dist_checkpointing

    base = base_optimizer(engine)
    keys, stepped = (MASTER, *moment_keys(base)), has_state(engine, base)
    if stepped:
        link_fragments(engine)  # not before: an empty state would be linked for good

    def values(p):
        return [(k, full_value(p, k, base) if stepped or k == MASTER else torch.zeros(_shape(p)))
                for k in keys]

    state = _sharded(chunks, values)
    step = saved_step(base) if stepped else (0.0 if "exp_avg" in keys else None)
    state["common"] = {"keys": list(keys), "step": step, "optimizer": type(base).__name__}
    Path(folder).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(folder))


def state_tensors(engine, base: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors ``base`` keeps state for: ZeRO-3's flat fp32 partitions (its param groups
    hold them only during a step), else the parameters of its groups."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(flat) if flat else [p for g in base.param_groups for p in g["params"]]


def create_state(engine, base: torch.optim.Optimizer, keys: tuple[str, ...],
                 step: Optional[float]) -> None:
    """Optimizer state as the saved step left it, zero-filled to be overwritten (DeepSpeed and
    torch create it only at the first step); DeepSpeed's fragments are linked to it."""
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for p in state_tensors(engine, base):
        st = base.state[p]
        for key in keys:
            st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if step is not None:
            st["step"] = torch.tensor(step, dtype=torch.float32,
                                      device=p.device if on_device else "cpu")
    link_fragments(engine)


def load(engine, chunks: list[torch.nn.Module], folder: Path) -> None:
    """The optimizer state saved by :func:`save` (at any layout) into ``engine``; the weights
    are already in ``chunks`` (a collective)."""
    from megatron.core import dist_checkpointing

    base = base_optimizer(engine)
    keys = (MASTER, *moment_keys(base))
    common = dist_checkpointing.load_common_state_dict(str(folder))["common"]
    if tuple(common["keys"]) != keys:
        raise CheckpointError(f"train.resume: {folder} holds {common['optimizer']} state "
                              f"{common['keys']}, this run's optimizer needs {list(keys)}; "
                              f"use the saved optim.name, or train.init_from (fresh optimizer)")
    create_state(engine, base, keys[1:], common["step"])
    request = _sharded(chunks, lambda p: [(k, torch.zeros(_shape(p))) for k in keys])
    missing = {name for name, p in _trained(chunks)} - {k.split("/", 1)[1] for k in request}
    if missing:
        raise CheckpointError(f"train.resume: parameters {sorted(missing)[:3]} have no "
                              f"sharded key; resume at the saved layout")
    loaded = dist_checkpointing.load(request, str(folder))
    for name, param in _trained(chunks):
        for key in keys:
            set_value(param, key, loaded[f"{key}/{name}"], base)
