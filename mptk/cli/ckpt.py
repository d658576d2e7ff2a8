"""``mptk-ckpt``: look into checkpoints and export their weights.

    mptk-ckpt inspect outputs/run                   # newest checkpoint of a run dir
    mptk-ckpt inspect outputs/run/checkpoints/step_00000300 optim.lr=3e-4   # config diff vs now
    mptk-ckpt export outputs/run --out gpt.pt       # one fp32 state dict at tp=1 pp=1
    mptk-ckpt export --format hf outputs/run hf/    # a Hugging Face folder (transformers loads it)

PATH is a checkpoint, a ``checkpoints`` dir or a run dir (then its newest intact checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from mptk.checkpoint import format as ck
from mptk.checkpoint.state import load_weights


class CliError(Exception):
    """One line for the user; exit code 2."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mptk-ckpt", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="step, layout, sizes, integrity, config diff vs now")
    ins.add_argument("path")
    ins.add_argument("overrides", nargs="*", help="Hydra overrides composing 'now' for the diff")
    ins.add_argument("--no-verify", action="store_true", help="skip hashing (sizes only)")
    exp = sub.add_parser("export", help="consolidated fp32 state dict, or a Hugging Face folder")
    exp.add_argument("path")
    exp.add_argument("out_dir", nargs="?", help="--format hf: the folder to write")
    exp.add_argument("--out", help="--format pt: file to write (torch.save of a dict)")
    exp.add_argument("--format", choices=("pt", "hf"), default="pt",
                     help="pt: one torch state dict; hf: config.json, model.safetensors, "
                          "tokenizer, generation_config.json (Llama- or GPT-2-style)")
    exp.add_argument("--tokenizer", help="--format hf: tokenizer.json to ship (default: the "
                                         "run's own, from its data cache)")
    return top


# --------------------------------------------------------------------------- finding


def find(path: str, check: bool = True) -> Path:
    """The checkpoint PATH names: itself, or the newest intact one below it."""
    pool = ck.resolve(path)
    if not pool:
        raise CliError(f"{path}: no checkpoint there; give a checkpoint, checkpoints dir or run dir")
    for folder in pool:
        problems = ck.verify(folder) if check else []
        if not problems:
            return folder
        print(f"mptk-ckpt: warning: {folder} is damaged ({'; '.join(problems[:3])})",
              file=sys.stderr)
    raise CliError(f"{path}: no intact checkpoint (see the warnings above)")


# --------------------------------------------------------------------------- inspect


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def part_sizes(folder: Path) -> dict[str, int]:
    """Bytes per top-level part (weights, deepspeed, rng, other)."""
    sizes: dict[str, int] = {}
    for name in ck.listing(folder):
        top = name.split("/")[0] if "/" in name else "other"
        sizes[top] = sizes.get(top, 0) + (folder / name).stat().st_size
    return sizes


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}


def config_diff(saved: dict, overrides: list[str]) -> list[str]:
    """``key: saved -> now`` lines; 'now' is the config composed from ``overrides`` with the
    adjustment ``mptk-train`` makes before a run (and so before its config is saved): the
    warm-up clamped to the run's length."""
    from mptk.config.checks import clamp_warmup
    from mptk.config.load import compose
    from mptk.log.metrics import config_dict

    composed = compose(overrides)
    clamp_warmup(composed)
    now, old = flatten(config_dict(composed)), flatten(saved)
    keys = sorted((set(now) | set(old)) - {"run_dir"})
    return [f"  {k}: {old.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}"
            for k in keys if old.get(k, "<absent>") != now.get(k, "<absent>")]


def layout_line(layout: dict) -> str:
    keys = ("tp", "pp", "vpp", "dp", "world", "zero_stage", "dtype", "global_batch_size")
    return " ".join(f"{k}={layout.get(k)}" for k in keys)


def cmd_inspect(args) -> None:
    folder = find(args.path, check=False)
    meta = ck.read_json(folder / ck.META)
    problems = [] if args.no_verify else ck.verify(folder)
    sizes = part_sizes(folder)
    latest = ck.read_latest(folder.parent)
    print(f"checkpoint  {folder}{'  (latest)' if latest == folder.name else ''}")
    print(f"step        {meta['step']}  ({meta.get('consumed_samples')} samples consumed)")
    print(f"saved       {meta.get('saved_at')}  torch {meta.get('torch')}  "
          f"recipe {meta.get('recipe')}")
    print(f"layout      {layout_line(meta.get('layout', {}))}")
    print(f"wandb run   {meta.get('wandb_run_id') or '-'}")
    state = "not checked" if args.no_verify else ("ok" if not problems else
                                                  "DAMAGED: " + "; ".join(problems[:5]))
    print(f"integrity   {state}")
    print("sizes       " + " | ".join(f"{k} {human(v)}" for k, v in sorted(sizes.items()))
          + f" | total {human(sum(sizes.values()))}")
    diff = config_diff(ck.read_json(folder / ck.CONFIG), args.overrides)
    print(f"config diff vs now ({len(diff)} keys){':' if diff else ''}")
    print("\n".join(diff)) if diff else None


# --------------------------------------------------------------------------- export


def typed_config(saved: dict):
    """The saved config.json as a typed RunConfig (the recipe's model schema)."""
    from omegaconf import DictConfig, OmegaConf

    from mptk.config import registry
    from mptk.config.load import to_run_config
    from mptk.config.schema import RunConfig

    node = OmegaConf.structured(RunConfig)
    node.model = OmegaConf.structured(registry.get(saved["model"]["recipe"]).config)
    # merged onto a structured (dict) node, the result is a DictConfig
    merged = cast(DictConfig, OmegaConf.merge(node, {k: v for k, v in saved.items() if k != "run_dir"}))
    return to_run_config(merged)


def single_process_world(seed: int) -> None:
    """A one-rank gloo world with tp=1 pp=1 on the CPU."""
    import torch

    from mptk.launch.runner import free_port
    from mptk.parallel import groups
    from mptk.parallel.env import DistEnv

    env = DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                  master_port=free_port(), launcher="spawn")
    groups.init(env, 1, 1, torch.device("cpu"), "gloo", seed)


def full_model(cfg):
    """The whole model (tp=1 pp=1) on the CPU, built by the recipe."""
    import torch

    from mptk.config import registry
    from mptk.parallel.layout import Layout
    from mptk.train.loop import build_model

    layout = Layout(tp=1, pp=1, dp=1, grad_acc=1, world=1)
    return build_model(registry.get(cfg.model.recipe), cfg, layout, torch.device("cpu"), "gloo")


def consolidated(folder: Path):
    """(run config, the full model's fp32 state dict at tp=1 pp=1) of checkpoint ``folder``
    saved at any tp/pp/vpp (dist-checkpointing reshards); starts a one-rank world."""
    import torch

    cfg = typed_config(ck.read_json(folder / ck.CONFIG))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = 1, 1, None
    single_process_world(cfg.train.seed)
    model = full_model(cfg)
    load_weights([model], folder)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    return cfg, state


def export_problems(args) -> list[str]:
    if args.format == "hf" and not (args.out_dir or args.out):
        return ["export --format hf: give the output folder (mptk-ckpt export --format hf SRC OUT)"]
    if args.format == "pt" and not args.out:
        return ["export: give --out FILE (or --format hf SRC OUT for a Hugging Face folder)"]
    return []


def cmd_export_hf(args, folder: Path) -> None:
    from mptk.checkpoint import hf, hf_names

    saved = typed_config(ck.read_json(folder / ck.CONFIG))
    fam, problems = hf_names.family(saved.model)
    if fam is None:  # before any process group or model exists
        raise CliError("; ".join(problems))
    tokenizer = Path(args.tokenizer) if args.tokenizer else hf.run_tokenizer(saved)
    if tokenizer is None or not tokenizer.is_file():
        raise CliError(f"--tokenizer: no tokenizer.json for {folder} (its data cache "
                       f"{saved.data.cache_dir} lacks it); pass --tokenizer PATH")
    cfg, state = consolidated(folder)
    out = Path(args.out_dir or args.out)
    hf.export(state, cfg.model, out, tokenizer)
    count = sum(v.numel() for v in state.values())
    print(f"mptk-ckpt: wrote {out}: {fam.value} ({count:,} parameters, fp32) from {folder}; "
          f"tokenizer {tokenizer}", flush=True)


def cmd_export(args) -> None:
    import torch

    problems = export_problems(args)
    if problems:
        raise CliError(problems[0])
    folder = find(args.path)
    if args.format == "hf":
        cmd_export_hf(args, folder)
        return
    _, state = consolidated(folder)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    count = sum(v.numel() for v in state.values())
    print(f"mptk-ckpt: wrote {args.out}: {len(state)} tensors, {count:,} parameters (fp32, "
          f"tp=1 pp=1) from {folder}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from mptk.log.noise import quiet

    quiet()
    args = parser().parse_args(argv)
    try:
        {"inspect": cmd_inspect, "export": cmd_export}[args.command](args)
    except (CliError, ck.CheckpointError, ValueError, KeyError) as err:
        print(f"mptk-ckpt: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if args.command == "export":
        from mptk.parallel import groups

        groups.finish(0)


if __name__ == "__main__":
    main()
