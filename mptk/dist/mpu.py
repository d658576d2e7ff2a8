"""The ``mpu`` object DeepSpeed asks for, answered from megatron-core's process groups.

Without it DeepSpeed treats the whole world as data parallel: its initial broadcast copies
rank 0's weights over every rank and silently corrupts tensor-parallel shards. megatron's
``parallel_state`` module itself lacks ``get_model_parallel_world_size``, hence this adapter.
It deliberately has no ``initialize_sequence_parallel``: DeepSpeed would take it for a
sequence-parallel mpu and ignore the data-parallel methods.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMpu:
    """Data-parallel = megatron's DP group; model-parallel = megatron's tp x pp group."""

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.get_model_parallel_group().rank()

    def get_model_parallel_world_size(self) -> int:
        return self.get_model_parallel_group().size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()
