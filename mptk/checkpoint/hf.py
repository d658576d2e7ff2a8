"""Hugging Face folders in and out: ``mptk-ckpt export --format hf`` writes one that
``transformers`` loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``; ``train.init_from=hf:DIR``
loads one into mptk's model at any tp/pp/vpp layout. The name and layout mapping is
:mod:`mptk.checkpoint.hf_names` (pure).

A folder holds ``config.json``, ``model.safetensors`` (fp32, the tensors written as converted:
no model is instantiated, so export -> import -> export is bit-identical), the tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``: a ``PreTrainedTokenizerFast``) and
``generation_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from mptk.checkpoint import hf_names as names
from mptk.checkpoint.format import CheckpointError

PREFIX = "hf:"
"""``train.init_from=hf:DIR`` names a Hugging Face folder instead of an mptk checkpoint."""
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def hf_dir(init_from: Optional[str]) -> Optional[Path]:
    """The folder of an ``hf:DIR`` setting (None for anything else)."""
    if init_from and str(init_from).startswith(PREFIX):
        return Path(str(init_from)[len(PREFIX):]).expanduser()
    return None


# --------------------------------------------------------------------------- tokenizer


def run_tokenizer(cfg: Any) -> Optional[Path]:
    """The ``tokenizer.json`` a run's data was tokenized with, where mptk made it (stdlib /
    files text caches, or beside the first ``data.blend`` prefix); None when not found."""
    from mptk.config.schema import DataSource
    from mptk.data import indexed, tokens

    data, vocab = cfg.data, cfg.model.vocab_size
    if data.source in (DataSource.stdlib, DataSource.files):
        found = [tokens.cache_path(data, vocab) / "tokenizer.json"]
    elif data.blend:
        from mptk.data import blend

        prefix = Path(blend.parse(data.blend).prefixes[0])
        found = [prefix.parent / "tokenizer.json", Path(f"{prefix}.tokenizer.json")]
    else:
        files = indexed.corpus.stdlib_files()
        root = Path(data.cache_dir).expanduser().resolve()
        found = [root / indexed.stdlib_key(cfg, files, vocab) / "tokenizer.json"]
    return next((p for p in found if p.is_file()), None)


def write_tokenizer(path: Path, out: Path) -> int:
    """``tokenizer.json`` at ``path`` as a ``PreTrainedTokenizerFast`` folder in ``out``; the
    end-of-document token is bos/eos/unk (as in GPT-2). Returns its id."""
    from transformers import PreTrainedTokenizerFast

    from mptk.data import tokenizer

    eod = tokenizer.EOD
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=eod, eos_token=eod,
                                   unk_token=eod, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    return tokenizer.eod_id(tokenizer.load(path))


# --------------------------------------------------------------------------- export


def export(state: dict[str, torch.Tensor], model: Any, out: Path,
           tokenizer_json: Optional[Path]) -> names.Family:
    """mptk's full (tp=1 pp=1) fp32 state dict of a GPT ``model`` config as a Hugging Face
    folder ``out``. An unsupported combination raises one line per field."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    fam, problems = names.family(model)
    if fam is None:
        raise CheckpointError("; ".join(problems))
    if tokenizer_json is None:
        raise CheckpointError("no tokenizer.json found for this run (its data cache is gone?): "
                              "pass --tokenizer PATH")
    out.mkdir(parents=True, exist_ok=True)
    eod = write_tokenizer(tokenizer_json, out)
    fields = names.hf_config(model, fam, eod)
    config = AutoConfig.for_model(**fields)
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(str(out))
    tensors = {k: v.detach().float().contiguous() for k, v in names.to_hf(state, model, fam).items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    return fam


# --------------------------------------------------------------------------- import


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; give a Hugging Face model folder")
    return dict(json.loads(path.read_text()))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` (or its sharded index), as fp32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())["weight_map"]
        files = [folder / f for f in sorted(set(index.values()))]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS} (nor {INDEX}); mptk reads safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return {k: v.float() for k, v in state.items()}


def problems(cfg: Any, init_from: str) -> list[str]:
    """Before any process starts: the folder is readable and this run's ``model.*`` matches
    its config.json (one line per field, with the override that fixes it)."""
    folder = hf_dir(init_from)
    assert folder is not None
    if cfg.model.recipe != "gpt":
        return [f"train.init_from={init_from}: Hugging Face folders initialise GPT models; "
                f"model.recipe is {cfg.model.recipe}"]
    try:
        hf = read_config(folder)
    except CheckpointError as err:
        return [f"train.init_from={init_from}: {err}"]
    if not ((folder / WEIGHTS).is_file() or (folder / INDEX).is_file()):
        return [f"train.init_from={init_from}: no {WEIGHTS} in {folder}"]
    return names.mismatches(cfg.model, hf, str(folder))


def chosen_model_fields(overrides: list[str]) -> set[str]:
    """``model.*`` field names set by command-line ``overrides`` (``model.x=``, ``+model.x=``)."""
    keys = (o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)
    return {k[len("model."):] for k in keys if k.startswith("model.")}


def fill_model(cfg: Any, overrides: list[str]) -> list[str]:
    """With ``train.init_from=hf:DIR``: the ``model.*`` fields the command line did not set
    are taken from DIR/config.json (the rest is checked by :func:`problems`). Returns the
    ``name=value`` changes; an unreadable folder changes nothing (:func:`problems` says why)."""
    folder = hf_dir(cfg.train.init_from)
    if folder is None or cfg.model.recipe != "gpt":
        return []
    try:
        hf = read_config(folder)
    except (CheckpointError, ValueError):
        return []
    return names.fill(cfg.model, hf, chosen_model_fields(overrides))


def fill_tokenizer(cfg: Any, overrides: list[str]) -> list[str]:
    """With ``train.init_from=hf:DIR`` and no ``data.tokenizer`` chosen: DIR's tokenizer (when
    it has one) tokenizes the training text. Returns the change, as :func:`fill_model`."""
    folder = hf_dir(cfg.train.init_from)
    if (folder is None or cfg.data.tokenizer
            or any(o.lstrip("+~").startswith("data.tokenizer=") for o in overrides)):
        return []
    if not ((folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        return []
    cfg.data.tokenizer = str(folder)
    return [f"data.tokenizer={folder}"]


def full_state(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face folder as mptk's full (tp=1 pp=1) state dict for ``model``."""
    hf = read_config(folder)
    lines = names.mismatches(model, hf, str(folder))
    if lines:
        raise CheckpointError("; ".join(lines))
    fam = names.Family(hf["model_type"])
    return names.from_hf(read_weights(folder), model, fam)


def load_into(chunks: list[torch.nn.Module], model: Any, folder: Path) -> None:
    """Hugging Face weights into this rank's model chunks (its tp shard of its pp stage's
    layers)."""
    full = full_state(model, folder)
    swiglu = model.activation is names.Activation.swiglu
    for chunk in chunks:
        local = chunk.state_dict(keep_vars=True)
        mine = {}
        for key, param in local.items():
            if not torch.is_tensor(param) or key.endswith("_extra_state"):
                continue
            name = global_name(chunk, key)
            if name not in full:
                raise CheckpointError(f"{folder}: nothing maps to mptk's {name}")
            mine[key] = shard(full[name], param, gated=swiglu and "mlp.linear_fc1" in key)
        chunk.load_state_dict(mine, strict=False)


def global_name(chunk: torch.nn.Module, key: str) -> str:
    """A chunk's local state-dict key with its layer index made global (megatron numbers a
    stage's layers from 0 locally, ``layer_number`` from 1 over the whole model)."""
    if not key.startswith("decoder.layers."):
        return key
    local, rest = key[len("decoder.layers."):].split(".", 1)
    layer: Any = chunk.decoder.layers[int(local)]  # type: ignore[union-attr,index]
    return f"decoder.layers.{int(layer.layer_number) - 1}.{rest}"


def shard(full: torch.Tensor, param: torch.Tensor, gated: bool) -> torch.Tensor:
    """This tp rank's slice of ``full`` for ``param``, along the ``partition_dim`` megatron
    marks its tensor-parallel parameters with (``tensor_model_parallel``; kept by
    :mod:`mptk.models.init`); a replicated parameter is ``full`` itself. A SwiGLU ``fc1``
    shard is ``[gate_i; up_i]``."""
    if not getattr(param, "tensor_model_parallel", False):
        if full.shape != param.shape:
            raise CheckpointError(f"shape {tuple(full.shape)} differs from mptk's replicated "
                                  f"{tuple(param.shape)}")
        return full
    from megatron.core import parallel_state

    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    dim = int(param.partition_dim)  # type: ignore[attr-defined]
    want = list(param.shape)
    want[dim] *= tp
    if list(full.shape) != want:
        raise CheckpointError(f"shape {tuple(full.shape)} is not tp={tp} x mptk's "
                              f"{tuple(param.shape)} along dim {dim}")
    if gated:
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]
