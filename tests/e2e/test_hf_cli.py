"""``mptk-train train.init_from=hf:DIR`` as a user runs it: a ``model.*`` override that
contradicts config.json is one line naming the field before any process starts; without
``model.*`` overrides the model is config.json's; a 20-step tp=2 fine-tune from a (random,
locally built) GPT-2 folder runs, saves, and resumes; ``mptk-generate --greedy`` at tp=2 and at
pp=2 on that checkpoint gives transformers' greedy ``generate`` tokens on its export."""

import json
from pathlib import Path

import pytest
import torch
from e2e_util import metrics, mptk, tiny

pytestmark = pytest.mark.e2e


def gpt2_folder(out: Path) -> Path:
    """A random GPT-2 with its own tokenizer (a BPE of 500 entries, trained on this file's
    text: other ids than the 512-entry one mptk would train on the stdlib)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mptk.data.tokenizer import train_bpe

    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                               n_positions=32)).save_pretrained(out)
    train_bpe([Path(__file__).read_text()] * 4, 500, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, cache):
    """A GPT-2 folder refused with a contradicting model.activation, then fine-tuned 20 steps
    at tp=2 with the model taken from its config.json (no model.* given) and resumed to step
    22 (one run dir, shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("hf_cli")
    src = gpt2_folder(tmp / "gpt2")
    args = (*[a for a in tiny(cache) if not a.startswith("model.")], "train=smoke",
            "train.eval_interval=0", "parallel.tp=2", "launcher.nproc_per_node=2",
            "train.save_interval=0", f"train.init_from=hf:{src}")
    wrong = mptk(*args, "model.activation=gelu", "model.hidden_size=64",
                 f"hydra.run.dir={tmp / 'wrong'}")
    run = tmp / "run"
    first = mptk(*args, "train.steps=20", f"hydra.run.dir={run}")
    steps = [r["step"] for r in metrics(run)] if (run / "metrics.jsonl").exists() else []
    second = mptk(*args, "train.steps=22", f"hydra.run.dir={run}")
    return {"src": src, "tmp": tmp, "run": run, "wrong": wrong, "first": first,
            "second": second, "steps_first": steps}


def test_mismatch_is_one_line_before_any_process(fine_tuned):
    wrong, src = fine_tuned["wrong"], fine_tuned["src"]
    assert wrong.returncode == 2
    assert (f"model.activation=gelu but {src}/config.json says gelu_tanh: use "
            f"model.activation=gelu_tanh or leave model.activation out") in wrong.stderr, wrong.stderr
    assert "model.hidden_size" not in wrong.stderr.split("error:")[-1]  # chosen and equal
    assert not (fine_tuned["tmp"] / "wrong" / "checkpoints").exists()


def test_fine_tune_from_hf_folder_saves_and_resumes(fine_tuned):
    first, second, run = fine_tuned["first"], fine_tuned["second"], fine_tuned["run"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"initialised weights from the Hugging Face folder {fine_tuned['src']}" in first.stdout
    assert f"mptk: from {fine_tuned['src']}: " in first.stderr
    assert f"data.tokenizer={fine_tuned['src']}" in first.stderr
    config = json.loads((run / "checkpoints" / "step_00000020" / "config.json").read_text())
    assert config["data"]["tokenizer"] == str(fine_tuned["src"])
    from tokenizers import Tokenizer

    used = [Tokenizer.from_file(str(p)).get_vocab() for p in
            Path(config["data"]["cache_dir"]).expanduser().glob("stdlib-*/tokenizer.json")]
    given = Tokenizer.from_file(str(fine_tuned["src"] / "tokenizer.json")).get_vocab()
    assert given in used and len(given) == 500  # the text was read with the folder's tokenizer
    saved = config["model"]
    assert (saved["activation"], saved["hidden_size"], saved["num_layers"], saved["seq_length"],
            saved["vocab_size"]) == ("gelu_tanh", 64, 2, 32, 512)
    assert max(fine_tuned["steps_first"]) == 20 and (run / "checkpoints" / "step_00000020").is_dir()
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert losses[19] < losses[0]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "at step 20" in second.stdout
    assert max(r["step"] for r in metrics(run)) == 22


PROMPTS = ["def main(", "import os\nclass "]


def test_generate_greedy_at_tp2_and_pp2_equals_transformers(fine_tuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = fine_tuned["tmp"] / "exported"
    done = mptk("export", "--format", "hf", str(fine_tuned["run"]), str(out), cmd="mptk-ckpt")
    assert done.returncode == 0, done.stderr[-3000:]
    args = [f"--prompt={p}" for p in PROMPTS]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for layout in (["parallel.tp=2"], ["parallel.tp=1", "parallel.pp=2"]):  # one layer a stage
        gen = mptk("--checkpoint", str(fine_tuned["run"]), *args, "--greedy", "--max-new-tokens",
                   "12", "--json", *layout, "launcher.nproc_per_node=2", cmd="mptk-generate")
        assert gen.returncode == 0, gen.stderr[-3000:]
        rows = [json.loads(line) for line in gen.stdout.splitlines() if line.startswith("{")]
        assert [r["prompt"] for r in rows] == PROMPTS
        for row in rows:
            ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
            with torch.no_grad():
                ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
            assert row["token_ids"] == ref.tolist(), (layout, row, ref.tolist())
            assert row["text"] == tok.decode([t for t in ref.tolist() if t != tok.eos_token_id])
    bad = mptk("--checkpoint", str(fine_tuned["run"]), "--prompt", "x", "--top-p", "0",
               cmd="mptk-generate")
    assert bad.returncode == 2 and "--top-p 0.0: need" in bad.stderr.replace("--temperature 1.0 --top-k 0 ", "")


def test_sampling_at_pp2_equals_one_process(fine_tuned):
    """The last stage samples with the seeded generator and every stage takes its token: at pp=2
    the sampled tokens are those of one process; another seed samples others."""
    def sample(seed, *layout):
        gen = mptk("--checkpoint", str(fine_tuned["run"]), f"--prompt={PROMPTS[0]}", "--json",
                   "--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "50", "--top-p",
                   "0.95", "--seed", str(seed), *layout, cmd="mptk-generate")
        assert gen.returncode == 0, gen.stderr[-3000:]
        return [json.loads(x) for x in gen.stdout.splitlines() if x.startswith("{")][0]["token_ids"]

    one = sample(7, "parallel.tp=1", "launcher.nproc_per_node=1")
    assert sample(7, "parallel.tp=1", "parallel.pp=2", "launcher.nproc_per_node=2") == one
    assert sample(8, "parallel.tp=1", "launcher.nproc_per_node=1") != one
