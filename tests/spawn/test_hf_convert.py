"""Hugging Face import and export with real gloo ranks, both families (Llama-style, GPT-2-style).

One tp=2 x pp=2 run per family (module-scoped, shared by every test here) starts from a random
Hugging Face model (``train.init_from=hf:DIR``; the Llama one with RoPE theta 50000 and its
model config filled from config.json), evaluates, trains 2 steps, saves; then
``mptk-ckpt export --format hf`` writes a folder from that tp2 x pp2 checkpoint. Checked:
mptk's held-out loss at tp2 x pp2 equals transformers' on the same batches (import, and after
training: export); logits of the full model on real text equal transformers' (1e-4); the
exported tokenizer round-trips text; export -> import -> export is bit-identical.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import run_world, tiny_overrides

from mptk.checkpoint import hf
from mptk.config.load import compose

FAMILIES = {
    "llama": ["model.position_embedding=rope", "model.normalization=RMSNorm",
              "model.activation=swiglu", "model.num_query_groups=2", "model.tie_embeddings=false",
              "model.bias=false", "model.norm_epsilon=1e-06", "model.ffn_hidden_size=96",
              "model.rotary_base=50000"],
    "gpt2": ["model.activation=gelu_tanh"],
}
LAYOUT = ["parallel.tp=2", "parallel.pp=2", "parallel.layers_per_stage=[1,1]", "zero=zero1",
          "launcher.nproc_per_node=4", "optim.lr=0.01"]
TEXT = Path(torch.__file__).read_text()[:1500]
"""Real text: the opening of a Python source file."""


def random_hf_model(family: str, out: Path) -> None:
    """A small random transformers model saved with ``save_pretrained`` (nothing downloaded);
    every weight perturbed so that norms and biases are not at their trivial init."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=50000.0))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=32))  # activation gelu_new (tanh)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # activations of order 1: GELU flavours differ
    model.save_pretrained(out)


def import_train_save(env, cfg):
    """Held-out loss right after the import and after 2 steps (then saved)."""
    import mptk.checkpoint as ck
    from mptk.train.loop import one_eval, one_step, setup

    w = setup(cfg, env)
    first = one_eval(w)["eval_loss"]
    for step in range(2):
        one_step(w, step)
    ck.save(w, 2)
    return {"imported": first, "trained": one_eval(w)["eval_loss"]}


def logits_of(model, tokens):
    from mptk.recipes.gpt.recipe import causal_mask

    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None],
                     causal_mask(tokens.shape[1], tokens.device))


def mptk_side(env, run_dir, source, exported, again, tokens):
    """In one rank: the checkpoint's full model (tp=1 pp=1, resharded), its logits on ``tokens``;
    the source folder imported (its logits); the exported folder loaded back (import) and
    written again (export)."""
    from mptk.checkpoint import format as fmt
    from mptk.checkpoint import hf
    from mptk.checkpoint.state import load_weights
    from mptk.cli import ckpt
    from mptk.parallel import groups

    folder = ckpt.find(str(run_dir))
    cfg = ckpt.typed_config(fmt.read_json(folder / fmt.CONFIG))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = 1, 1, None
    groups.init(env, 1, 1, torch.device("cpu"), "gloo", 0)
    model = ckpt.full_model(cfg)
    load_weights([model], folder)
    logits = logits_of(model, tokens)
    imported = ckpt.full_model(cfg)
    hf.load_into([imported], cfg.model, Path(source))
    back = ckpt.full_model(cfg)
    hf.load_into([back], cfg.model, Path(exported))
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values()) if torch.is_tensor(a))
    state = {k: v for k, v in back.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("_extra_state")}
    hf.export(state, cfg.model, Path(again), Path(exported) / "tokenizer.json")
    return {"logits": logits, "imported_logits": logits_of(imported, tokens),
            "reimported_equal": same}


def hf_eval_loss(folder: Path, cfg) -> float:
    """transformers' mean loss over the held-out batches mptk evaluates (dp=1)."""
    from transformers import AutoModelForCausalLM

    from mptk.data.indexed import IndexedData
    from mptk.train.preflight import preflight

    layout = preflight(cfg, 4, False)
    data = IndexedData.prepare(cfg, layout, cfg.model.vocab_size, log=lambda s: None, dp_rank=0)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    losses = []
    with torch.no_grad():
        for batch in data.eval_batches():
            logits = model(batch["tokens"]).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                            batch["labels"].flatten()))
    return torch.stack(losses).mean().item()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def made(request, data_cache, tmp_path_factory):
    family, tmp = request.param, tmp_path_factory.mktemp(request.param)
    random_hf_model(family, tmp / "source")
    chosen = tiny_overrides(data_cache) + LAYOUT + [f"train.init_from=hf:{tmp / 'source'}"]
    cfg = compose(chosen + FAMILIES[family])
    if family == "llama":  # no model.* for Llama's fields: config.json fills them
        cfg = compose(chosen)
        filled = hf.fill_model(cfg, chosen)
        assert cfg.model == compose(chosen + FAMILIES[family]).model, filled
        assert len(filled) == len(FAMILIES[family]), filled
    cfg.run_dir = str(tmp / "run")
    evals = run_world(import_train_save, 4, cfg, tmp=tmp)[0]
    done = subprocess.run([str(Path(sys.executable).parent / "mptk-ckpt"), "export", "--format",
                           "hf", str(tmp / "run"), str(tmp / "exported")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoTokenizer

    tokens = torch.tensor([AutoTokenizer.from_pretrained(tmp / "exported")(TEXT)["input_ids"][:32]])
    side = run_world(mptk_side, 1, tmp / "run", tmp / "source", tmp / "exported", tmp / "again", tokens, tmp=tmp)[0]
    return {"family": family, "tmp": tmp, "cfg": cfg, "evals": evals, "tokens": tokens,
            "stdout": done.stdout, **side}


def hf_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return type(model).__name__, model(tokens).logits


@pytest.mark.spawn
def test_import_at_tp2_pp2_equals_transformers(made):
    ref = hf_eval_loss(made["tmp"] / "source", made["cfg"])
    assert abs(made["evals"]["imported"] - ref) <= 1e-5, (made["evals"], ref)
    diff = (hf_logits(made["tmp"] / "source", made["tokens"])[1] - made["imported_logits"]).abs().max()
    assert diff <= 1e-4, diff.item()


@pytest.mark.spawn
def test_export_from_tp2_pp2_equals_mptk(made):
    out = made["tmp"] / "exported"
    kind, logits = hf_logits(out, made["tokens"])
    assert kind == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[made["family"]]
    diff = (logits - made["logits"]).abs().max().item()
    assert diff <= 1e-4, diff
    # the trained tp2 x pp2 model's own held-out loss, against the exported model's
    ref = hf_eval_loss(out, made["cfg"])
    assert abs(made["evals"]["trained"] - ref) <= 1e-5, (made["evals"], ref)
    assert abs(made["evals"]["trained"] - made["evals"]["imported"]) > 1e-4  # training moved it


@pytest.mark.spawn
def test_exported_tokenizer_round_trips(made):
    from transformers import AutoTokenizer

    from mptk.checkpoint import hf
    from mptk.data import tokenizer

    fast = AutoTokenizer.from_pretrained(made["tmp"] / "exported")
    ids = fast(TEXT)["input_ids"]
    assert fast.decode(ids) == TEXT
    own = tokenizer.load(hf.run_tokenizer(made["cfg"]))
    assert ids == own.encode(TEXT, add_special_tokens=False).ids
    assert fast.eos_token == tokenizer.EOD


@pytest.mark.spawn
def test_export_import_export_is_bit_identical(made):
    from safetensors.torch import load_file

    assert made["reimported_equal"]
    first = load_file(made["tmp"] / "exported" / "model.safetensors")
    second = load_file(made["tmp"] / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
