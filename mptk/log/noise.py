"""Silence notices that say nothing to a user (no apex/TE fallbacks, deprecations)."""

import logging
import warnings


def quiet() -> None:
    for module in ("megatron", "torch.distributed", "deepspeed"):
        warnings.filterwarnings("ignore", module=module)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
