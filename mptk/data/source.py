"""A rank's view of token data: the sampler bound to its dp rank, micro-batch and grad_acc.

Recipes hand the loop an object with ``batch(step, micro)`` and ``eval_batches()``; this is
the one for token data (the stdlib default or text files). A megatron indexed dataset can
provide the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mptk.config.schema import RunConfig
from mptk.data import tokens


@dataclass(slots=True)
class TokenData:
    """Token batches for one data-parallel rank (identical on its tp/pp peers)."""

    sampler: tokens.TokenSampler
    heldout: np.ndarray
    seq_length: int
    micro_batch_size: int
    grad_acc: int
    dp_rank: int
    dp_size: int
    eval_batches_n: int

    @classmethod
    def prepare(cls, cfg: RunConfig, layout, vocab_size: int, log=print) -> "TokenData":
        """Tokenize (once, cached) and bind to this rank's place in the dp group."""
        from mptk.dist import groups

        folder = tokens.prepare(cfg.data, vocab_size, log=log)
        seq = cfg.model.seq_length
        return cls(sampler=tokens.TokenSampler(tokens.load_split(folder, "train"), seq,
                                               cfg.train.seed),
                   heldout=tokens.load_split(folder, "heldout"), seq_length=seq,
                   micro_batch_size=cfg.train.micro_batch_size, grad_acc=layout.grad_acc,
                   dp_rank=groups.dp_rank(), dp_size=layout.dp,
                   eval_batches_n=cfg.train.eval_batches)

    def batch(self, step: int, micro: int) -> dict:
        return self.sampler.batch(step, micro, self.micro_batch_size, self.grad_acc,
                                  self.dp_rank, self.dp_size)

    def eval_batches(self) -> list[dict]:
        return tokens.eval_batches(self.heldout, self.seq_length, self.micro_batch_size,
                                   self.eval_batches_n, self.dp_rank, self.dp_size)
