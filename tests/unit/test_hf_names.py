"""The Hugging Face name/layout mapping without processes: which family, one line per
unsupported field, megatron's per-group QKV layout, config.json mismatches, exact round trips."""

import torch

from mptk.checkpoint import hf_names as names
from mptk.config.load import compose

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.vocab_size=512", "model.seq_length=32"]
LLAMA = ["model.position_embedding=rope", "model.normalization=RMSNorm", "model.activation=swiglu",
         "model.num_query_groups=2", "model.tie_embeddings=false"]


def model(*extra):
    return compose(TINY + list(extra)).model


def fake_state(m) -> dict:
    """A full mptk state dict of the right shapes, every entry distinct."""
    d = names.dims(m)
    h, qkv = m.hidden_size, (d["heads"] + 2 * d["groups"]) * d["head_dim"]
    fc1 = 2 * d["ffn"] if m.activation.value == "swiglu" else d["ffn"]
    shapes = {"embedding.word_embeddings.weight": (m.vocab_size, h),
              "decoder.final_layernorm.weight": (h,), "output_layer.weight": (m.vocab_size, h)}
    if m.position_embedding.value == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (m.seq_length, h)
    if m.normalization.value == "LayerNorm":
        shapes["decoder.final_layernorm.bias"] = (h,)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        layer = {"self_attention.linear_qkv": (qkv, h), "self_attention.linear_proj": (h, h),
                 "mlp.linear_fc1": (fc1, h), "mlp.linear_fc2": (h, d["ffn"])}
        for name, shape in layer.items():
            shapes[p + name + ".weight"] = shape
            if m.bias:
                shapes[p + name + ".bias"] = shape[:1]
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
            if m.normalization.value == "LayerNorm":
                shapes[p + norm + ".bias"] = (h,)
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def test_family_and_one_line_per_field():
    assert names.family(model())[0] is names.Family.gpt2
    assert names.family(model(*LLAMA))[0] is names.Family.llama
    fam, lines = names.family(model("model.position_embedding=rope"))
    assert fam is None and len(lines) == 2
    assert lines[0].startswith("model.normalization=LayerNorm: a Llama-style export")
    assert lines[1].startswith("model.activation=gelu:")
    fam, lines = names.family(model("model.tie_embeddings=false", "model.num_query_groups=2"))
    assert fam is None and [x.split(":")[0] for x in lines] == [
        "model.tie_embeddings=false", "model.num_query_groups=2"]


def test_qkv_split_follows_megatron_query_groups():
    m = model(*LLAMA)  # 4 heads in 2 groups of head_dim 16: [q0 q1 k0 v0 | q2 q3 k1 v1]
    rows = torch.arange(8 * 16).float()[:, None]
    q, k, v = names.split_qkv(rows, m)
    blocks = [list(range(b * 16, b * 16 + 16)) for b in range(8)]
    assert q[:, 0].long().tolist() == blocks[0] + blocks[1] + blocks[4] + blocks[5]
    assert k[:, 0].long().tolist() == blocks[2] + blocks[6]
    assert v[:, 0].long().tolist() == blocks[3] + blocks[7]
    assert torch.equal(names.fuse_qkv(q, k, v, m), rows)


def test_round_trips_are_exact():
    for m in (model(*LLAMA), model(), model(*LLAMA, "model.bias=false", "model.tie_embeddings=true")):
        fam = names.family(m)[0]
        state = fake_state(m)
        if m.tie_embeddings:
            state["output_layer.weight"] = state["embedding.word_embeddings.weight"]
        hf = names.to_hf(state, m, fam)
        back = names.from_hf(hf, m, fam)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
        again = names.to_hf(back, m, fam)
        assert all(torch.equal(again[k], hf[k]) for k in hf)


def test_gpt2_layout_is_conv1d():
    m = model()
    state = fake_state(m)
    hf = names.to_hf(state, m, names.Family.gpt2)
    assert hf["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], state["decoder.layers.0.mlp.linear_fc1.weight"].t())
    assert "lm_head.weight" not in hf


def test_config_mismatches_name_the_override():
    m = model(*LLAMA)
    cfg = names.hf_config(m, names.Family.llama, eod=0)
    assert names.mismatches(m, cfg, "/x") == []
    lines = names.mismatches(model(), cfg, "/x")
    assert "model.position_embedding=learned_absolute but /x/config.json says rope: use " \
           "model.position_embedding=rope or leave model.position_embedding out (then " \
           "config.json's value is taken)" in lines
    assert any(x.startswith("model.num_query_groups=4 but /x/config.json says 2: use "
                            "model.num_query_groups=2 or") for x in lines)
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32,
            "vocab_size": 512, "activation_function": "gelu_new"}
    assert names.mismatches(model("model.activation=gelu_tanh"), gpt2, "/g") == []
    assert [x.split(" or ")[0] for x in names.mismatches(model(), gpt2, "/g")] == [
        "model.activation=gelu but /g/config.json says gelu_tanh: use model.activation=gelu_tanh"]
    assert names.model_fields({"model_type": "bert"})[1][0].startswith("config.json model_type='bert'")


def test_fill_takes_config_json_except_the_chosen_fields():
    from mptk.checkpoint.hf import chosen_model_fields

    llama = model(*LLAMA, "model.hidden_size=96", "model.num_attention_heads=6",
                  "model.ffn_hidden_size=160")
    cfg = names.hf_config(llama, names.Family.llama, eod=0)
    m = model()  # GPT-2-style defaults: every architecture field differs from the Llama folder
    chosen = chosen_model_fields(["model.num_layers=2", "+model.vocab_size=512", "train.steps=3",
                                  "model=gpt_tiny"])
    assert chosen == {"num_layers", "vocab_size"}
    changed = names.fill(m, cfg, chosen | {"hidden_size"})
    assert changed == ["num_attention_heads=6", "num_query_groups=2", "ffn_hidden_size=160",
                       "position_embedding=rope", "normalization=RMSNorm", "activation=swiglu",
                       "tie_embeddings=False"]
    # the chosen field that disagrees stays and is one mismatch line; nothing else differs
    lines = names.mismatches(m, cfg, "/x")
    assert [x.split(":")[0] for x in lines] == ["model.hidden_size=64 but /x/config.json says 96"]
    assert names.fill(m, cfg, set()) == ["hidden_size=96"]
    assert names.mismatches(m, cfg, "/x") == [] and names.family(m)[0] is names.Family.llama
    gpt2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 48,
            "vocab_size": 512, "activation_function": "gelu_new"}
    g = model()
    assert names.fill(g, gpt2, set()) == ["num_layers=3", "seq_length=48", "activation=gelu_tanh"]
    assert names.mismatches(g, gpt2, "/g") == []


def test_rope_theta_is_model_rotary_base_both_ways():
    m = model(*LLAMA, "model.rotary_base=500000")
    cfg = names.hf_config(m, names.Family.llama, eod=0)
    assert cfg["rope_theta"] == 500000.0
    fresh = model(*LLAMA)
    assert names.fill(fresh, cfg, set()) == ["rotary_base=500000.0"]
    chosen = model(*LLAMA)
    assert [x.split(":")[0] for x in names.mismatches(chosen, cfg, "/x")] == [
        "model.rotary_base=10000.0 but /x/config.json says 500000.0"]
    v5 = {**cfg, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}
    del v5["rope_theta"]
    fields, lines = names.model_fields(v5)
    assert fields["rotary_base"] == 1e6
    assert lines == ["config.json rope_type=linear: mptk's RoPE has no scaling (only rope_theta, "
                     "as model.rotary_base)"]
