"""Text generation from a checkpoint on every rank of a tp x pp world.

mptk's own loop over the megatron ``GPTModel`` with megatron-core's
``StaticInferenceContext`` as the KV cache: one prefill forward over the prompt fills each
layer's key/value memory, then one forward per new token (megatron's attention switches to
no-mask decode once the cache holds the prompt). megatron gathers the logits over tp
(``runtime_gather_output``), so every tp rank draws the same token from the same seeded
generator. At pp>1 each stage runs its layers (and keeps their cache), hands its hidden states
to the next stage (point-to-point over the pp group), and the last stage's token is broadcast
over the pp group. ``cache=False`` recomputes the whole sequence per token (the benchmark's
baseline).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(kw_only=True, slots=True)
class Sampling:
    """How the next token is chosen."""

    max_new_tokens: int = 32
    """New tokens per prompt (fewer when the end-of-document token comes first)."""
    greedy: bool = False
    """Always the most likely token (temperature, top-k, top-p ignored)."""
    temperature: float = 1.0
    """Logits divided by this before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to p (1: all)."""
    seed: int = 0
    """Seed of the sampling generator (the same on every rank)."""
    cache: bool = True
    """Keep keys and values of past tokens (megatron's inference context)."""
    stream: bool = False
    """Print each new token's text on rank 0 as it comes."""


@dataclass(slots=True)
class Output:
    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0


def choose(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """The next token from last-position logits ``[vocab]``."""
    if s.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / max(s.temperature, 1e-6)
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, index = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the token that crosses p
        logits[index[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def last_logits(model, tokens: torch.Tensor, start: int, context) -> Optional[torch.Tensor]:
    """Full-vocabulary logits ``[vocab]`` after ``tokens`` (positions from ``start``) on the
    last pipeline stage; None on the others (their hidden states went to the next stage)."""
    from megatron.core import parallel_state as ps

    from mptk.recipes.gpt.recipe import causal_mask

    staged = ps.get_pipeline_model_parallel_world_size() > 1
    if staged and not ps.is_pipeline_first_stage():
        param = next(model.parameters())
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size,
                             dtype=param.dtype, device=param.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    positions = torch.arange(start, start + tokens.shape[1])[None]
    mask = causal_mask(tokens.shape[1], tokens.device) if start == 0 else None
    out = model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
    if staged and not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out[0, -1]


def agreed(token: Optional[int]) -> int:
    """The last stage's token on every stage (itself at pp=1)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        assert token is not None
        return token
    group = ps.get_pipeline_model_parallel_group()
    box = torch.tensor([-1 if token is None else token])
    dist.broadcast(box, src=dist.get_process_group_ranks(group)[-1], group=group)
    return int(box)


@torch.no_grad()
def generate_one(model, prompt_ids: list[int], s: Sampling, eod: int, decode=None) -> list[int]:
    """New token ids after ``prompt_ids``."""
    from megatron.core.inference.contexts import StaticInferenceContext

    generator = torch.Generator().manual_seed(s.seed)
    total = len(prompt_ids) + s.max_new_tokens
    context = StaticInferenceContext(1, total) if s.cache else None
    seq, new = list(prompt_ids), []
    fresh = torch.tensor([seq])
    for _ in range(s.max_new_tokens):
        start = len(seq) - fresh.shape[1]
        logits = last_logits(model, fresh, start, context)
        token = agreed(None if logits is None else choose(logits, s, generator))
        new.append(token)
        if decode is not None:
            decode(token)
        if token == eod:
            break
        seq.append(token)
        if context is not None:
            context.sequence_len_offset += fresh.shape[1]
            fresh = torch.tensor([[token]])
        else:
            fresh = torch.tensor([seq])
    return new


def load_model(cfg: Any, folder: Path, env) -> torch.nn.Module:
    """This rank's tp shard of its pp stage with the checkpoint's weights."""
    from mptk.checkpoint.state import load_weights
    from mptk.config import registry
    from mptk.parallel import groups
    from mptk.parallel.layout import Layout
    from mptk.plan import partition
    from mptk.train.trainer import build_model

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    groups.init(env, tp, pp, torch.device("cpu"), "gloo", cfg.train.seed)
    stages = partition.stage_layers(cfg.model, pp, None, cfg.parallel.layers_per_stage) \
        if pp > 1 else []
    layout = Layout(tp=tp, pp=pp, dp=env.world_size // (tp * pp), grad_acc=1,
                    world=env.world_size, stage_layers=tuple(stages))
    model = build_model(registry.get(cfg.model.recipe), cfg, layout, torch.device("cpu"), "gloo")
    load_weights([model], folder)
    return model.eval()


def run(env, cfg: Any, folder: Path, tokenizer_json: Path, prompts: list[str],
        s: Sampling) -> list[Output]:
    """A rank of ``mptk-generate``: every prompt in turn; rank 0 streams when asked."""
    from mptk.data import tokenizer

    tok = tokenizer.load(tokenizer_json)
    model = load_model(cfg, folder, env)
    eod, outputs = tokenizer.eod_id(tok), []
    for prompt in prompts:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        printer = _streamer(tok, prompt) if s.stream and env.rank == 0 else None
        begin = time.perf_counter()
        new = generate_one(model, ids, s, eod, decode=printer)
        text = tok.decode([t for t in new if t != eod])
        outputs.append(Output(prompt, text, new, time.perf_counter() - begin))
        if printer is not None:
            print(flush=True)
    return outputs


def _streamer(tok, prompt: str):
    """Prints the prompt, then each new token's text as soon as it decodes to whole characters."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    done: list[int] = []
    shown = [0]

    def show(token: int) -> None:
        done.append(token)
        text = tok.decode(done)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[shown[0]:])
            sys.stdout.flush()
            shown[0] = len(text)
    return show


def problems(cfg: Any, world: int, s: Sampling) -> list[str]:
    """One line per setting generation cannot run with."""
    lines = []
    if cfg.model.recipe != "gpt":
        lines.append(f"model.recipe={cfg.model.recipe}: mptk-generate needs a GPT checkpoint")
    p = cfg.parallel
    if (p.vpp or 1) > 1:
        lines.append(f"parallel.vpp={p.vpp}: mptk-generate runs one stage per rank; add "
                     f"parallel.vpp=null")
    if world % (p.tp * p.pp):
        lines.append(f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide "
                     f"launcher.nproc_per_node={world}")
    if s.max_new_tokens < 1:
        lines.append(f"--max-new-tokens {s.max_new_tokens}: give 1 or more")
    if not s.greedy and (s.temperature <= 0 or not 0 < s.top_p <= 1 or s.top_k < 0):
        lines.append(f"--temperature {s.temperature} --top-k {s.top_k} --top-p {s.top_p}: need "
                     f"temperature > 0, top-k >= 0, 0 < top-p <= 1 (or --greedy)")
    return lines


def seconds_of(outputs: list[Output]) -> Optional[float]:
    return sum(o.seconds for o in outputs) if outputs else None
