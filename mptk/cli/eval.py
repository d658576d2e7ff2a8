"""``mptk-eval``: held-out loss, perplexity and token count of a checkpoint, at any layout.

    mptk-eval --checkpoint outputs/run                        # the run's own held-out set
    mptk-eval --checkpoint outputs/run --json parallel.tp=2 launcher.nproc_per_node=2
    mptk-eval --checkpoint outputs/run data=indexed data.blend=/data/web_text_document

Overrides change the saved config: a layout (the run's held-out samples are kept: the number of
eval batches follows dp), another dataset (a group such as ``data=indexed`` replaces the saved
``data`` section), ``train.eval_batches``. Ranks start through the one local rank runner; the
evaluation is the trainer's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mptk-eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints dir or run dir")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    p.add_argument("overrides", nargs="*",
                   help="e.g. parallel.tp=2 launcher.nproc_per_node=2, data=indexed data.blend=P")
    return p


def prepared(folder: Path, overrides: list[str]):
    """(typed config to evaluate with, its Layout); raises on bad input before any process."""
    import torch

    from mptk.checkpoint import format as ck
    from mptk.cli.generate import config
    from mptk.train.evaluate import same_samples
    from mptk.train.preflight import PreflightError, preflight

    cfg = config(folder, overrides)
    saved = config(folder, [])
    layout = preflight(cfg, cfg.launcher.nproc_per_node, torch.cuda.is_available())
    if not any(o.split("=", 1)[0] == "train.eval_batches" for o in overrides):
        saved_dp = int(ck.read_json(folder / ck.META).get("layout", {}).get("dp", 1))
        t = saved.train
        lines = same_samples(cfg, t.eval_batches * t.micro_batch_size * saved_dp, layout.dp)
        if lines:
            raise PreflightError(lines)
    return cfg, layout


def main(argv: list[str] | None = None) -> None:
    from mptk.checkpoint import format as ck
    from mptk.checkpoint.format import CheckpointError
    from mptk.cli.ckpt import CliError, find
    from mptk.config.load import ConfigError
    from mptk.launch import runner
    from mptk.log.noise import quiet
    from mptk.train import evaluate
    from mptk.train.preflight import PreflightError

    quiet()
    args = parser().parse_args(argv)
    try:
        folder = find(args.checkpoint)
        cfg, layout = prepared(folder, args.overrides)
        with tempfile.TemporaryDirectory(prefix="mptk-eval-") as scratch:
            evaluate.scratch(cfg, str(folder), scratch)
            result = runner.run(evaluate.run, layout.world, cfg, stdout_to_stderr=True,
                                name="mptk-eval")[0]
    except (CliError, ConfigError, PreflightError, CheckpointError, ValueError, KeyError) as err:
        text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"mptk-eval: error: {text}", file=sys.stderr, flush=True)
        sys.exit(2)
    except runner.RankError as err:
        print(f"mptk-eval: error: {err.details()}", file=sys.stderr, flush=True)
        sys.exit(1)
    step = ck.read_json(folder / ck.META).get("step")
    if args.json:
        print(json.dumps({"checkpoint": str(folder), "step": step, **asdict(result)}), flush=True)
    else:
        print(f"mptk-eval: {folder} (step {step}): held-out loss {result.eval_loss:.6f}, perplexity "
              f"{result.perplexity:.3f} over {result.tokens:,} tokens ({result.samples} samples; "
              f"{result.layout})", flush=True)


if __name__ == "__main__":
    main()
