"""``mptk-generate``: text from a checkpoint, at any tp x pp, with a KV cache.

    mptk-generate --checkpoint outputs/run --prompt "def main(" --greedy
    mptk-generate --checkpoint outputs/run --prompt "import " --prompt "class " \\
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1 --json parallel.tp=2 launcher.nproc_per_node=2

Tokens stream on a terminal; ``--json`` prints one line per prompt instead
(``{"prompt", "text", "token_ids"}``, the new tokens). Overrides change the saved config
(e.g. the layout): ranks start through the one local rank runner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mptk-generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints dir or run dir")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute every position per token")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's own)")
    p.add_argument("overrides", nargs="*", help="e.g. parallel.tp=2 launcher.nproc_per_node=2")
    return p


def config(folder: Path, overrides: list[str]):
    """The checkpoint's saved config with ``overrides`` merged, typed. A group choice
    (``data=indexed``) replaces that whole section with the group's option, as composed by
    Hydra; dotted keys (``data.blend=...``) then change single fields."""
    from omegaconf import OmegaConf

    from mptk.checkpoint import format as ck
    from mptk.cli.ckpt import typed_config
    from mptk.config.load import compose_cfg

    saved = OmegaConf.create(ck.read_json(folder / ck.CONFIG))
    choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    if choices:
        composed = compose_cfg([c.lstrip("+") for c in choices])
        for choice in choices:
            key = choice.split("=", 1)[0].lstrip("+")
            saved[key] = OmegaConf.to_container(composed[key], resolve=True)
    dotted = [o for o in overrides if o not in choices]
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(dotted))
    return typed_config(dict(OmegaConf.to_container(merged, resolve=True)))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    from mptk.checkpoint import hf
    from mptk.cli.ckpt import CliError, find
    from mptk.launch import runner
    from mptk.log.noise import quiet
    from mptk.train import generate

    quiet()
    args = parser().parse_args(argv)
    s = generate.Sampling(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, cache=not args.no_cache,
                          stream=not args.json and sys.stdout.isatty())
    try:
        folder = find(args.checkpoint)
        cfg = config(folder, args.overrides)
        world = cfg.launcher.nproc_per_node
        lines = generate.problems(cfg, world, s)
        tok = Path(args.tokenizer) if args.tokenizer else hf.run_tokenizer(cfg)
        if tok is None:
            lines.append("--tokenizer: the run's tokenizer.json is not in its data cache; pass it")
        if lines:
            raise CliError("\n".join(f"mptk-generate: error: {x}" for x in lines))
        outputs = runner.run(generate.run, world, cfg, folder, tok, args.prompt, s,
                             stdout_to_stderr=False, name="mptk-generate")[0]
    except (CliError, ValueError, KeyError) as err:
        text = str(err)
        print(text if text.startswith("mptk-generate:") else f"mptk-generate: error: {text}",
              file=sys.stderr, flush=True)
        sys.exit(2)
    except runner.RankError as err:
        print(f"mptk-generate: error: {err.details()}", file=sys.stderr, flush=True)
        sys.exit(1)
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids}),
                  flush=True)
        elif not s.stream:
            print(out.prompt + out.text, flush=True)


if __name__ == "__main__":
    main()
