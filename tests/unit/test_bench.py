"""mptk-bench without processes: the plain baseline has the recipe's shape, variants
compose as documented, ratios and failures are reported."""

import json

import pytest
import torch

from mptk.cli import bench as cli
from mptk.config.load import compose
from mptk.launch import bench
from mptk.models import baseline
from mptk.plan.cost import shape_of, total_params


@pytest.mark.parametrize("overrides", [["model=gpt_tiny"], ["model=gpt_small"], ["model=gpt_1p3b"],
                                       ["model=gpt_tiny", "model.bias=false"]])
def test_plain_gpt_has_the_recipes_parameter_count(overrides):
    """Same shape as megatron's GPTModel (biases unless model.bias=false, two norms per layer,
    final norm, tied output; learned positions or RoPE), counted as the planner counts it."""
    cfg = compose(overrides)
    with torch.device("meta"):
        plain = baseline.PlainGPT(cfg.model)
    assert sum(p.numel() for p in plain.parameters()) == total_params(shape_of(cfg.model))


def test_plain_gpt_1p3b_matches_megatron_count():
    """1,311,625,216: the megatron-core GPTModel mptk builds for model=gpt_1p3b (measured)."""
    with torch.device("meta"):
        plain = baseline.PlainGPT(compose(["model=gpt_1p3b"]).model)
    assert sum(p.numel() for p in plain.parameters()) == 1_311_625_216


def test_plain_gpt_trains_a_step_on_cpu():
    cfg = compose(["model=gpt_tiny", "model.position_embedding=rope", "model.num_layers=1"])
    torch.manual_seed(0)
    model = baseline.PlainGPT(cfg.model)
    tokens = torch.randint(cfg.model.vocab_size, (2, cfg.model.seq_length + 1))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.model.vocab_size))).item()) < 0.5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rope_matches_megatron():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    seq, heads, dim = 8, 2, 16
    t = torch.randn(seq, 1, heads, dim)  # megatron: [s, b, h, d]
    rotary = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, use_cpu_initialization=True)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), rotary.inv_freq)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :]  # as RotaryEmbedding.forward
    ref = _apply_rotary_pos_emb_bshd(t, freqs)
    cos, sin = baseline.rope_tables(seq, dim)
    got = baseline.apply_rope(t.transpose(0, 1), cos, sin).transpose(0, 1)  # ours: [b, s, h, d]
    torch.testing.assert_close(got, ref)


def test_variant_config_batch_steps_and_order(tmp_path):
    args = cli.parse_args(["--shape", "tiny", "--steps", "4", "--warmup", "3",
                           "train.micro_batch_size=3", "zero=zero3"])
    cfg = bench.compose_variant(args, "zero1_compile", nproc=2)
    assert cfg.train.global_batch_size == 6 and cfg.train.steps == 7
    assert cfg.zero.stage == 1  # the variant's overrides come last
    assert cfg.train.compile and cfg.optim.fused
    assert cfg.model.num_layers == 2 and cfg.parallel.tp == 1
    big = bench.compose_variant(cli.parse_args(["--shape", "1p3b"]), "zero1", nproc=1)
    assert big.model.hidden_size == 2048 and big.train.dtype.value == "bf16"
    assert big.train.global_batch_size == 4


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "zero1,warp9"])
    assert "warp9" in capsys.readouterr().err


def test_baselines_first_and_ratio():
    assert bench.ordered(["zero1", "torch_eager", "torch_compile"]) == \
        ["torch_eager", "torch_compile", "zero1"]
    done = {"torch_eager": {"tflops_per_device": 100.0},
            "torch_compile": {"tflops_per_device": 200.0}}
    record = {"tflops_per_device": 150.0}
    bench.add_ratio(record, done)
    assert record == {"tflops_per_device": 150.0, "baseline": "torch_compile", "vs_baseline": 0.75}


def test_a_failing_variant_is_a_line_and_exit_1(monkeypatch, capsys, tmp_path):
    def fake(fn, world, job, timeout):
        if job["variant"] == "zero1":
            raise RuntimeError("ValueError: boom")
        return [{"tflops_per_device": 2.0, "tokens_per_s": 10.0, "peak_mem_gib": 1.0,
                 "step_time_s": 0.1, "mfu": None}]

    monkeypatch.setattr(bench, "run_ranks", fake)
    monkeypatch.setattr(bench, "prepare_data", lambda cfg: None)
    out = tmp_path / "lines.jsonl"
    code = cli.main(["--variants", "zero1,torch_eager,zero0", "--out", str(out)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [x["variant"] for x in lines] == ["torch_eager", "zero1", "zero0"]
    assert lines[1]["error"] == "ValueError: boom"
    assert lines[2]["vs_baseline"] == 1.0 and lines[2]["impl"] == "mptk"
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
