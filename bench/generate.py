"""Generation speed with and without the KV cache (``mptk-generate``'s loop).

The quick-start model (``model=gpt_tiny``: 4 layers x 128, vocabulary 4096, 128 positions) on
the CPU, fp32, at tp=1 (``--tp 2`` on 2 local gloo ranks), weights from the seed (speed does
not depend on them; ``--checkpoint`` loads a run's instead). Greedy decoding of
``--new-tokens`` tokens after a ``--prompt-tokens`` prompt, never stopping early. With the
cache: one prefill forward, then one single-token forward per new token
(:class:`megatron.core.inference.contexts.StaticInferenceContext`); without: the whole sequence
again for every token. Prints the median of ``--repeats`` runs of each, as tokens/s, and the
ratio; both paths must give the same tokens.

    .venv/bin/python bench/generate.py [--model gpt_tiny] [--prompt-tokens 16] \\
        [--new-tokens 112] [--tp 1] [--repeats 3] [--checkpoint RUN]

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def model_for(env, cfg, checkpoint):
    """This rank's tp shard: the checkpoint's weights, or the seed's."""
    import torch

    from mptk.config import registry
    from mptk.parallel import groups
    from mptk.parallel.layout import Layout
    from mptk.train.generate import load_model
    from mptk.train.trainer import build_model

    if checkpoint is not None:
        return load_model(cfg, checkpoint, env)
    tp = cfg.parallel.tp
    groups.init(env, tp, 1, torch.device("cpu"), "gloo", cfg.train.seed)
    layout = Layout(tp=tp, pp=1, dp=env.world_size // tp, grad_acc=1, world=env.world_size)
    return build_model(registry.get(cfg.model.recipe), cfg, layout, torch.device("cpu"),
                       "gloo").eval()


def measure(env, cfg, checkpoint, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Seconds per run of each path (median) and whether their tokens agree."""
    import torch

    from mptk.train.generate import Sampling, generate_one

    torch.set_num_threads(max(1, torch.get_num_threads() // env.world_size))
    model = model_for(env, cfg, checkpoint)
    prompt = torch.randint(0, cfg.model.vocab_size, (prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    out: dict = {}
    tokens: dict[bool, list[int]] = {}
    for cache in (True, False):
        s = Sampling(max_new_tokens=new_tokens, greedy=True, cache=cache)
        generate_one(model, prompt, s, eod=-1)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tokens[cache] = generate_one(model, prompt, s, eod=-1)
            times.append(time.perf_counter() - start)
        out["cache" if cache else "no_cache"] = statistics.median(times)
    out["same_tokens"] = tokens[True] == tokens[False]
    out["new"] = len(tokens[True])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_tiny")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=112)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", help="a run dir or checkpoint (default: seed weights)")
    a = parser.parse_args()

    from mptk.cli.ckpt import find
    from mptk.cli.generate import config
    from mptk.config.load import compose
    from mptk.launch import runner

    layout = [f"parallel.tp={a.tp}", f"launcher.nproc_per_node={a.tp}", "parallel.pp=1"]
    folder = find(a.checkpoint) if a.checkpoint else None
    cfg = config(folder, layout) if folder else compose([f"model={a.model}", *layout])
    with tempfile.TemporaryDirectory() as tmp:
        got = runner.run(measure, a.tp, cfg, folder, a.prompt_tokens, a.new_tokens, a.repeats,
                         tmp=Path(tmp), stdout_to_stderr=True, name="bench-generate")[0]
    m = cfg.model
    print(f"model {folder or a.model}: {m.num_layers} layers x {m.hidden_size}, vocabulary "
          f"{m.vocab_size}; tp={a.tp} on the CPU (fp32); prompt {a.prompt_tokens} tokens, "
          f"{got['new']} new (greedy), median of {a.repeats}")
    print("| KV cache | seconds | new tokens/s |")
    print("|---|---:|---:|")
    for key, name in (("cache", "yes"), ("no_cache", "no")):
        print(f"| {name} | {got[key]:.3f} | {got['new'] / got[key]:.0f} |")
    print(f"speed-up with the cache: {got['no_cache'] / got['cache']:.2f}x; same tokens: "
          f"{got['same_tokens']}")


if __name__ == "__main__":
    main()
