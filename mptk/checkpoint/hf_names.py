"""Pure mapping between mptk's GPT (megatron-core ``GPTModel`` at tp=1 pp=1) and the two
Hugging Face families: Llama-style (``LlamaForCausalLM``) and GPT-2-style (``GPT2LMHeadModel``).

No process group, no file: state dicts in, state dicts and config dicts out.

- megatron's fused ``linear_qkv`` is laid out per query group: ``[q x heads_per_group, k, v]``
  for each of the ``num_query_groups`` groups (rows of ``kv_channels`` each);
- SwiGLU's ``linear_fc1`` is ``[gate; up]`` (at tp=1);
- megatron's non-interleaved RoPE is Hugging Face's rotate-half: no q/k permutation;
- GPT-2's ``Conv1D`` stores ``[in, out]``, the transpose of ``nn.Linear``;
- megatron's ``gelu`` is exact (HF ``gelu``), ``gelu_tanh`` is HF ``gelu_new`` /
  ``gelu_pytorch_tanh``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch

from mptk.config.schema import Activation, Normalization, PositionEmbedding

Tensor = torch.Tensor
ROPE_THETA = 10000.0
"""megatron ``GPTModel``'s default ``rotary_base`` (``model.rotary_base``)."""


class Family(Enum):
    llama = "llama"
    gpt2 = "gpt2"


# --------------------------------------------------------------------------- which family


def family(model: Any) -> tuple[Family | None, list[str]]:
    """The Hugging Face family of an mptk GPT config, or one line per field that rules both
    out."""
    if model.recipe != "gpt":
        return None, [f"model.recipe={model.recipe}: only GPT models have a Hugging Face export"]
    if model.position_embedding is PositionEmbedding.rope:
        need = {"model.normalization": (model.normalization, Normalization.RMSNorm),
                "model.activation": (model.activation, Activation.swiglu)}
        lines = [f"{k}={have.value}: a Llama-style export (position_embedding=rope) needs "
                 f"{k}={want.value}" for k, (have, want) in need.items() if have is not want]
        return (None, lines) if lines else (Family.llama, [])
    lines = []
    if model.normalization is not Normalization.LayerNorm:
        lines.append(f"model.normalization={model.normalization.value}: a GPT-2-style export "
                     f"(learned positions) needs LayerNorm (or use position_embedding=rope)")
    if model.activation is Activation.swiglu:
        lines.append("model.activation=swiglu: a GPT-2-style export (learned positions) needs "
                     "gelu or gelu_tanh (or use position_embedding=rope for Llama-style)")
    if not model.bias:
        lines.append("model.bias=false: GPT-2's layers have biases; use model.bias=true")
    if not model.tie_embeddings:
        lines.append("model.tie_embeddings=false: GPT-2 ties the output layer to the embedding")
    groups = model.num_query_groups
    if groups not in (None, model.num_attention_heads):
        lines.append(f"model.num_query_groups={groups}: GPT-2 has no grouped-query attention "
                     f"(heads {model.num_attention_heads})")
    return (None, lines) if lines else (Family.gpt2, [])


def dims(model: Any) -> dict[str, int]:
    """Heads, query groups, head size and MLP width as megatron derives them."""
    heads = model.num_attention_heads
    return {"heads": heads, "groups": model.num_query_groups or heads,
            "head_dim": model.hidden_size // heads,
            "ffn": model.ffn_hidden_size or 4 * model.hidden_size}


# --------------------------------------------------------------------------- configs


def hf_config(model: Any, fam: Family, eod: int) -> dict[str, Any]:
    """config.json fields (``model_type`` included) for ``model`` in family ``fam``."""
    d = dims(model)
    if fam is Family.llama:
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
                "intermediate_size": d["ffn"], "num_hidden_layers": model.num_layers,
                "num_attention_heads": d["heads"], "num_key_value_heads": d["groups"],
                "head_dim": d["head_dim"], "hidden_act": "silu",
                "max_position_embeddings": model.seq_length, "rms_norm_eps": model.norm_epsilon,
                "rope_theta": float(model.rotary_base), "attention_bias": model.bias, "mlp_bias": model.bias,
                "tie_word_embeddings": model.tie_embeddings, "bos_token_id": eod,
                "eos_token_id": eod, "torch_dtype": "float32"}
    act = "gelu_new" if model.activation is Activation.gelu_tanh else "gelu"
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": model.vocab_size, "n_embd": model.hidden_size, "n_layer": model.num_layers,
            "n_head": d["heads"], "n_inner": d["ffn"], "n_positions": model.seq_length,
            "activation_function": act, "layer_norm_epsilon": model.norm_epsilon,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True, "bos_token_id": eod, "eos_token_id": eod,
            "torch_dtype": "float32"}


_GPT2_ACTS = {"gelu": Activation.gelu, "gelu_new": Activation.gelu_tanh,
              "gelu_pytorch_tanh": Activation.gelu_tanh}


def model_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """mptk ``model.*`` values a Hugging Face config.json implies, and one line per setting
    mptk cannot represent."""
    kind = hf.get("model_type")
    if kind == "llama":
        return _llama_fields(hf)
    if kind == "gpt2":
        return _gpt2_fields(hf)
    return {}, [f"config.json model_type={kind!r}: mptk imports model_type llama or gpt2"]


def _llama_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    lines = []
    if hf.get("head_dim", hidden // heads) != hidden // heads:
        lines.append(f"config.json head_dim={hf['head_dim']}: mptk needs hidden_size/heads "
                     f"({hidden // heads})")
    if hf.get("hidden_act", "silu") != "silu":
        lines.append(f"config.json hidden_act={hf['hidden_act']}: mptk's SwiGLU is silu")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", ROPE_THETA))
    scaling = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
    if scaling != "default":
        lines.append(f"config.json rope_type={scaling}: mptk's RoPE has no scaling (only "
                     f"rope_theta, as model.rotary_base)")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        lines.append("config.json attention_bias != mlp_bias: mptk has one switch (model.bias)")
    fields = {"num_layers": hf["num_hidden_layers"], "hidden_size": hidden,
              "num_attention_heads": heads,
              "num_query_groups": hf.get("num_key_value_heads") or heads,
              "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
              "position_embedding": PositionEmbedding.rope, "normalization": Normalization.RMSNorm,
              "activation": Activation.swiglu, "bias": bool(hf.get("attention_bias", False)),
              "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
              "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
              "rotary_base": float(theta)}
    return fields, lines


def _gpt2_fields(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    lines = []
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        lines.append(f"config.json activation_function={act}: mptk has {sorted(_GPT2_ACTS)}")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            lines.append(f"config.json {key}=true: not in mptk's attention")
    if not hf.get("scale_attn_weights", True):
        lines.append("config.json scale_attn_weights=false: mptk scales by 1/sqrt(head_dim)")
    hidden = hf.get("n_embd", 768)
    fields = {"num_layers": hf.get("n_layer", 12), "hidden_size": hidden,
              "num_attention_heads": hf.get("n_head", 12), "num_query_groups": None,
              "ffn_hidden_size": hf.get("n_inner") or 4 * hidden,
              "seq_length": hf.get("n_positions", 1024), "vocab_size": hf.get("vocab_size", 50257),
              "position_embedding": PositionEmbedding.learned_absolute,
              "normalization": Normalization.LayerNorm, "activation": _GPT2_ACTS.get(act, Activation.gelu),
              "bias": True, "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
              "tie_embeddings": True}
    return fields, lines


def _comparable(name: str, value: Any, model: Any) -> Any:
    """``model.name`` in the form :func:`model_fields` gives (derived defaults filled in)."""
    have = getattr(model, name)
    if name == "num_query_groups":
        return have or model.num_attention_heads, value or model.num_attention_heads
    if name == "ffn_hidden_size":
        return have or 4 * model.hidden_size, value
    return have, value


def _shown(value: Any) -> Any:
    return "null" if value is None else value.value if isinstance(value, Enum) else value


def mismatches(model: Any, hf: dict[str, Any], where: str) -> list[str]:
    """One line per ``model.*`` field that differs from what ``where``/config.json says."""
    fields, lines = model_fields(hf)
    for name, value in fields.items():
        have, want = _comparable(name, value, model)
        if have != want:
            lines.append(f"model.{name}={_shown(have)} but {where}/config.json says "
                         f"{_shown(want)}: use model.{name}={_shown(want)} or leave "
                         f"model.{name} out (then config.json's value is taken)")
    return lines


def fill(model: Any, hf: dict[str, Any], chosen: set[str]) -> list[str]:
    """Set every ``model.*`` field config.json implies, except the ``chosen`` ones (set on
    the command line: :func:`mismatches` checks those). Returns ``name=value`` per change."""
    fields, _ = model_fields(hf)
    changed = []
    for name, value in fields.items():
        if name in chosen or not hasattr(model, name):
            continue
        have, want = _comparable(name, value, model)
        if have != want:
            setattr(model, name, value)
            changed.append(f"{name}={_shown(value)}")
    return changed


# --------------------------------------------------------------------------- weights

_LAYER = "decoder.layers.{i}."


def split_qkv(w: Tensor, model: Any) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's per-group ``[q.., k, v]`` rows (weight or bias) -> q, k, v."""
    d = dims(model)
    per = d["heads"] // d["groups"]
    g = w.reshape(d["groups"], per + 2, d["head_dim"], *w.shape[1:])
    rest = w.shape[1:]
    return (g[:, :per].reshape(-1, *rest), g[:, per].reshape(-1, *rest),
            g[:, per + 1].reshape(-1, *rest))


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, model: Any) -> Tensor:
    """q, k, v rows -> megatron's per-group layout (the inverse of :func:`split_qkv`)."""
    d = dims(model)
    per, rest = d["heads"] // d["groups"], q.shape[1:]
    parts = [q.reshape(d["groups"], per, d["head_dim"], *rest),
             k.reshape(d["groups"], 1, d["head_dim"], *rest),
             v.reshape(d["groups"], 1, d["head_dim"], *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _linears(model: Any) -> list[str]:
    return ["weight", "bias"] if model.bias else ["weight"]


def _norms(model: Any) -> list[str]:
    return ["weight", "bias"] if model.normalization is Normalization.LayerNorm else ["weight"]


def to_hf(state: dict[str, Tensor], model: Any, fam: Family) -> dict[str, Tensor]:
    """mptk's full (tp=1 pp=1) state dict -> the family's Hugging Face state dict."""
    layer = _llama_layer_to_hf if fam is Family.llama else _gpt2_layer_to_hf
    out: dict[str, Tensor] = {}
    for i in range(model.num_layers):
        out.update(layer(state, model, i))
    pre, post = ("model.", "lm_head") if fam is Family.llama else ("transformer.", None)
    out[pre + ("embed_tokens" if fam is Family.llama else "wte") + ".weight"] = \
        state["embedding.word_embeddings.weight"]
    if fam is Family.gpt2:
        out["transformer.wpe.weight"] = state["embedding.position_embeddings.weight"]
    final = "model.norm." if fam is Family.llama else "transformer.ln_f."
    for p in _norms(model):
        out[final + p] = state[f"decoder.final_layernorm.{p}"]
    if post and not model.tie_embeddings:
        out[post + ".weight"] = state["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _llama_layer_to_hf(state: dict[str, Tensor], model: Any, i: int) -> dict[str, Tensor]:
    src, dst, out = _LAYER.format(i=i), f"model.layers.{i}.", {}
    for p in _norms(model):
        out[dst + f"input_layernorm.{p}"] = state[src + f"input_layernorm.{p}"]
        out[dst + f"post_attention_layernorm.{p}"] = state[src + f"pre_mlp_layernorm.{p}"]
    ffn = dims(model)["ffn"]
    for p in _linears(model):
        q, k, v = split_qkv(state[src + f"self_attention.linear_qkv.{p}"], model)
        out.update({dst + f"self_attn.q_proj.{p}": q, dst + f"self_attn.k_proj.{p}": k,
                    dst + f"self_attn.v_proj.{p}": v})
        out[dst + f"self_attn.o_proj.{p}"] = state[src + f"self_attention.linear_proj.{p}"]
        fc1 = state[src + f"mlp.linear_fc1.{p}"]
        out[dst + f"mlp.gate_proj.{p}"], out[dst + f"mlp.up_proj.{p}"] = fc1[:ffn], fc1[ffn:]
        out[dst + f"mlp.down_proj.{p}"] = state[src + f"mlp.linear_fc2.{p}"]
    return out


def _conv1d(t: Tensor) -> Tensor:
    """``nn.Linear`` weight ``[out, in]`` <-> GPT-2 ``Conv1D`` ``[in, out]`` (biases as they are)."""
    return t.t() if t.dim() == 2 else t


def _gpt2_layer_to_hf(state: dict[str, Tensor], model: Any, i: int) -> dict[str, Tensor]:
    src, dst, out = _LAYER.format(i=i), f"transformer.h.{i}.", {}
    for p in ("weight", "bias"):
        out[dst + f"ln_1.{p}"] = state[src + f"input_layernorm.{p}"]
        out[dst + f"ln_2.{p}"] = state[src + f"pre_mlp_layernorm.{p}"]
        qkv = split_qkv(state[src + f"self_attention.linear_qkv.{p}"], model)
        out[dst + f"attn.c_attn.{p}"] = _conv1d(torch.cat(qkv, dim=0))
        out[dst + f"attn.c_proj.{p}"] = _conv1d(state[src + f"self_attention.linear_proj.{p}"])
        out[dst + f"mlp.c_fc.{p}"] = _conv1d(state[src + f"mlp.linear_fc1.{p}"])
        out[dst + f"mlp.c_proj.{p}"] = _conv1d(state[src + f"mlp.linear_fc2.{p}"])
    return out


def from_hf(hf: dict[str, Tensor], model: Any, fam: Family) -> dict[str, Tensor]:
    """A Hugging Face state dict -> mptk's full (tp=1 pp=1) state dict (the inverse of
    :func:`to_hf`; the tied output layer is filled from the embedding)."""
    layer = _llama_layer_from_hf if fam is Family.llama else _gpt2_layer_from_hf
    out: dict[str, Tensor] = {}
    for i in range(model.num_layers):
        out.update(layer(hf, model, i))
    pre = "model." if fam is Family.llama else "transformer."
    word = hf[pre + ("embed_tokens" if fam is Family.llama else "wte") + ".weight"]
    out["embedding.word_embeddings.weight"] = word
    if fam is Family.gpt2:
        out["embedding.position_embeddings.weight"] = hf["transformer.wpe.weight"]
    final = "model.norm." if fam is Family.llama else "transformer.ln_f."
    for p in _norms(model):
        out[f"decoder.final_layernorm.{p}"] = hf[final + p]
    tied = model.tie_embeddings or "lm_head.weight" not in hf
    out["output_layer.weight"] = word if tied else hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _llama_layer_from_hf(hf: dict[str, Tensor], model: Any, i: int) -> dict[str, Tensor]:
    src, dst, out = f"model.layers.{i}.", _LAYER.format(i=i), {}
    for p in _norms(model):
        out[dst + f"input_layernorm.{p}"] = hf[src + f"input_layernorm.{p}"]
        out[dst + f"pre_mlp_layernorm.{p}"] = hf[src + f"post_attention_layernorm.{p}"]
    for p in _linears(model):
        att = src + "self_attn."
        out[dst + f"self_attention.linear_qkv.{p}"] = fuse_qkv(
            hf[att + f"q_proj.{p}"], hf[att + f"k_proj.{p}"], hf[att + f"v_proj.{p}"], model)
        out[dst + f"self_attention.linear_proj.{p}"] = hf[att + f"o_proj.{p}"]
        out[dst + f"mlp.linear_fc1.{p}"] = torch.cat(
            [hf[src + f"mlp.gate_proj.{p}"], hf[src + f"mlp.up_proj.{p}"]], dim=0)
        out[dst + f"mlp.linear_fc2.{p}"] = hf[src + f"mlp.down_proj.{p}"]
    return out


def _gpt2_layer_from_hf(hf: dict[str, Tensor], model: Any, i: int) -> dict[str, Tensor]:
    src, dst, out = f"transformer.h.{i}.", _LAYER.format(i=i), {}
    for p in ("weight", "bias"):
        out[dst + f"input_layernorm.{p}"] = hf[src + f"ln_1.{p}"]
        out[dst + f"pre_mlp_layernorm.{p}"] = hf[src + f"ln_2.{p}"]
        q, k, v = _conv1d(hf[src + f"attn.c_attn.{p}"]).chunk(3, dim=0)
        out[dst + f"self_attention.linear_qkv.{p}"] = fuse_qkv(q, k, v, model)
        out[dst + f"self_attention.linear_proj.{p}"] = _conv1d(hf[src + f"attn.c_proj.{p}"])
        out[dst + f"mlp.linear_fc1.{p}"] = _conv1d(hf[src + f"mlp.c_fc.{p}"])
        out[dst + f"mlp.linear_fc2.{p}"] = _conv1d(hf[src + f"mlp.c_proj.{p}"])
    return out
