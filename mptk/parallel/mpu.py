"""The ``mpu`` object DeepSpeed asks for, answered from megatron-core's process groups.

Without it DeepSpeed treats the whole world as data parallel: its initial broadcast copies
rank 0's weights over every rank and silently corrupts tensor-parallel shards. megatron's
``parallel_state`` module itself lacks ``get_model_parallel_world_size``, hence this adapter.
It deliberately has no ``initialize_sequence_parallel``: DeepSpeed would take it for a
sequence-parallel mpu and ignore the data-parallel methods.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as ps


class MegatronMpu:
    """Data-parallel = megatron's dp x cp group; model-parallel = megatron's tp x pp group.

    DeepSpeed's "data parallel" is whoever averages gradients and shares ZeRO partitions: with
    context parallelism that is dp x cp (every cp rank computed the gradient of other tokens of
    the same samples). The data loader's dp rank and size stay pure dp (``groups.dp_rank``).
    """

    def get_data_parallel_group(self) -> Any:
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return int(ps.get_data_parallel_rank(with_context_parallel=True))

    def get_data_parallel_world_size(self) -> int:
        return int(ps.get_data_parallel_world_size(with_context_parallel=True))

    def get_model_parallel_group(self) -> Any:
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return int(self.get_model_parallel_group().rank())

    def get_model_parallel_world_size(self) -> int:
        return int(self.get_model_parallel_group().size())

    def get_tensor_model_parallel_group(self) -> Any:
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return int(ps.get_tensor_model_parallel_rank())

    def get_tensor_model_parallel_world_size(self) -> int:
        return int(ps.get_tensor_model_parallel_world_size())

    def get_pipeline_model_parallel_group(self) -> Any:
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return int(ps.get_pipeline_model_parallel_rank())

    def get_pipeline_model_parallel_world_size(self) -> int:
        return int(ps.get_pipeline_model_parallel_world_size())


def mark_parameters(model: torch.nn.Module) -> None:
    """Tell DeepSpeed's gradient-norm code which parameters to count once.

    DeepSpeed counts a parameter if it is model-parallel or if ``mpu.get_model_parallel_rank()``
    is 0 — but that rank is over tp x pp, so on later pipeline stages replicated parameters
    (norms, row-parallel biases) would be skipped; and it counts the last stage's copy of a tied
    embedding a second time. Marking tp-rank-0 replicas ``model_parallel`` and the tied copy
    ``ds_pipe_replicated`` (DeepSpeed's own flag for pipeline-tied weights) fixes both.
    """
    tp_rank = ps.get_tensor_model_parallel_rank()
    for param in model.parameters():
        if getattr(param, "shared", False):
            param.ds_pipe_replicated = True  # type: ignore[attr-defined]
        elif tp_rank == 0 and not getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True  # type: ignore[attr-defined]
