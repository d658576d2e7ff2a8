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
from mptk.data.order import Place


@dataclass(slots=True)
class TokenData:
    """Token batches for one data-parallel rank (identical on its tp/pp peers)."""

    sampler: tokens.TokenSampler
    heldout: np.ndarray
    seq_length: int
    place: Place

    @classmethod
    def prepare(cls, cfg: RunConfig, layout, vocab_size: int, log=print) -> "TokenData":
        """Tokenize (once, cached) and bind to this rank's place in the dp group."""
        folder = tokens.prepare(cfg.data, vocab_size, log=log)
        seq = cfg.model.seq_length
        return cls(sampler=tokens.TokenSampler(tokens.load_split(folder, "train"), seq,
                                               cfg.train.seed),
                   heldout=tokens.load_split(folder, "heldout"), seq_length=seq,
                   place=Place.of(cfg, layout))

    def batch(self, step: int, micro: int) -> dict:
        p = self.place
        return self.sampler.batch(step, micro, p.micro_batch_size, p.grad_acc, p.dp_rank,
                                  p.dp_size)

    def eval_batches(self) -> list[dict]:
        p = self.place
        return tokens.eval_batches(self.heldout, self.seq_length, p.micro_batch_size,
                                   p.eval_batches, p.dp_rank, p.dp_size)
