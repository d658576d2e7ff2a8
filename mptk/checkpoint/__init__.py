"""Checkpoints: the on-disk format (:mod:`~mptk.checkpoint.format`), what a rank saves and loads
(:mod:`~mptk.checkpoint.state`), writing one (:mod:`~mptk.checkpoint.writer`) and where a run
starts (:mod:`~mptk.checkpoint.resume`). The names below are the package's public API."""

from mptk.checkpoint.format import (
                                    CONFIG,
                                    DEEPSPEED_TAG,
                                    LATEST,
                                    MANIFEST,
                                    META,
                                    RNG,
                                    WEIGHTS,
                                    CheckpointError,
                                    candidates,
                                    checkpoints_dir,
                                    describe,
                                    layout_record,
                                    listing,
                                    meta_record,
                                    prune,
                                    publish,
                                    read_json,
                                    read_latest,
                                    resolve,
                                    step_name,
                                    step_of,
                                    verify,
)
from mptk.checkpoint.resume import (
                                    RESUME_KEYS,
                                    Decision,
                                    Plan,
                                    decide,
                                    layout_problem,
                                    prepare,
                                    restore,
                                    startup_problems,
)
from mptk.checkpoint.state import chunks_of, load_weights, rng_state, set_rng_state
from mptk.checkpoint.writer import due, save

__all__ = [
    "CONFIG", "DEEPSPEED_TAG", "LATEST", "MANIFEST", "META", "RESUME_KEYS", "RNG", "WEIGHTS",
    "CheckpointError", "Decision", "Plan", "candidates", "checkpoints_dir", "chunks_of",
    "decide", "describe", "due", "layout_problem", "layout_record", "listing", "load_weights",
    "meta_record", "prepare", "prune", "publish", "read_json", "read_latest", "resolve",
    "restore", "rng_state", "save", "set_rng_state", "startup_problems", "step_name",
    "step_of", "verify",
]
