"""The ViT recipe: config schema, model builder (megatron-core ``CLIPViTModel`` + class-token
head), batch -> loss with top-1 counts, and image data (digits or an image folder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mptk.compat import cpu
from mptk.config.schema import AttentionImpl, DataSource, ModelConfig, RunConfig
from mptk.models import megatron, registry
from mptk.models.attention import SdpaAttention


@dataclass(kw_only=True, slots=True)
class ViTConfig(ModelConfig):
    """A vision transformer classifier (megatron-core ``CLIPViTModel`` + linear head)."""

    recipe: str = "vit"
    image_size: int = 8
    """Input height and width in pixels (images are resized to it)."""
    patch_size: int = 2
    """Patch height and width; must divide ``image_size``."""
    channels: int = 1
    """Input channels: 1 (grey) or 3 (RGB)."""
    num_classes: int = 10
    """Classes of the head; must match the data's class count."""
    seq_length: int = 17
    """Not read: the sequence is (image_size / patch_size)**2 patches + 1 class token."""


def layer_spec(cfg: ViTConfig) -> ModuleSpec:
    """megatron's local ViT layer, bidirectional (the stock local spec is causal)."""
    spec = get_vit_layer_with_local_spec()
    attention = spec.submodules.self_attention
    if cfg.attention is AttentionImpl.sdpa:
        attention.submodules.core_attention = SdpaAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return spec


class ViTClassifier(MegatronModule):
    """Patch embedding from the config, the megatron ViT, then norm + linear on the class token.

    A ``MegatronModule``, so dist-checkpointing can shard its weights like GPT's.
    """

    def __init__(self, cfg: ViTConfig, config: TransformerConfig):
        super().__init__(config=config)
        with cpu.device_scope():  # CLIPViTModel puts its position ids on CUDA (.cuda())
            self.backbone = CLIPViTModel(
                config, layer_spec(cfg), ln_pre_impl=WrappedTorchNorm, add_class_token=True,
                class_token_len=1, patch_dim=cfg.patch_size, img_h=cfg.image_size,
                img_w=cfg.image_size, model_subtype="clip")
        # CLIPViTModel hard-codes 3 input channels: the patch embedding follows the config.
        self.backbone.conv1 = torch.nn.Conv2d(cfg.channels, cfg.hidden_size, cfg.patch_size,
                                              stride=cfg.patch_size, bias=False,
                                              dtype=config.params_dtype)
        self.norm = WrappedTorchNorm(config, cfg.hidden_size, eps=config.layernorm_epsilon)
        self.head = torch.nn.Linear(cfg.hidden_size, cfg.num_classes,
                                    dtype=config.params_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, c, h, w]`` images -> ``[b, num_classes]`` logits."""
        hidden = self.backbone(images.to(self.head.weight.dtype))  # [b, s, h]
        return self.head(self.norm(hidden[:, 0]))


def build(cfg: ViTConfig, ctx: registry.ModelContext) -> ViTClassifier:
    """The whole classifier (pp=1; tensor parallel inside the transformer layers)."""
    return ViTClassifier(cfg, megatron.transformer_config(cfg, ctx.tp, ctx.pp, ctx.dtype))


def loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the micro-batch; top-1 counts as sums."""
    logits = model(batch["images"]).float()
    labels = batch["labels"]
    value = F.cross_entropy(logits, labels)
    correct = (logits.argmax(-1) == labels).sum().detach()  # no sync; the loop sums it
    return value, {"correct": correct, "samples": labels.numel()}


def data(cfg: RunConfig, layout, log=print):
    """Digits (default) or an image folder, resized to the model's input."""
    from mptk.data.images import ImageData

    m = cfg.model
    return ImageData.prepare(cfg, layout, m.image_size, m.channels, m.num_classes, log=log)


def eval_summary(sums: dict) -> dict:
    """Held-out top-1 accuracy from the dp-summed counts."""
    return {"eval_top1": sums["correct"] / max(sums["samples"], 1.0)}


def checks(cfg: RunConfig) -> list[str]:
    """ViT-specific preflight lines."""
    return [*_image_checks(cfg.model), *_layout_checks(cfg), *_data_checks(cfg)]


def _image_checks(m: ViTConfig) -> list[str]:
    problems = []
    if m.patch_size < 1 or m.image_size < 1 or m.image_size % m.patch_size:
        problems.append(f"model.patch_size({m.patch_size}) must divide model.image_size"
                        f"({m.image_size}); e.g. model.patch_size=2 for 8x8 images")
    if m.channels not in (1, 3):
        problems.append(f"model.channels({m.channels}) must be 1 (grey) or 3 (RGB)")
    if m.num_classes < 2:
        problems.append(f"model.num_classes({m.num_classes}) must be >= 2")
    return problems


def _layout_checks(cfg: RunConfig) -> list[str]:
    if cfg.parallel.pp == 1:
        return []
    return [f"parallel.pp({cfg.parallel.pp}): the ViT recipe runs without pipeline "
            f"parallelism (CLIPViTModel is one stage); use parallel.pp=1 and tp/dp instead"]


def _data_checks(cfg: RunConfig) -> list[str]:
    source = cfg.data.source
    if source not in (DataSource.digits, DataSource.image_folder):
        return [f"data.source={source.value} is text; the ViT recipe needs images: "
                f"data.source=digits or data.source=image_folder (or experiment=vit_digits)"]
    if source is DataSource.image_folder:
        return _folder_checks(cfg.data.image_root, cfg.model.num_classes)
    return []


def _folder_checks(root: str, num_classes: int) -> list[str]:
    """The folder exists and has one sub-folder per model class."""
    from mptk.data.images import class_names

    if not root:
        return ["data.image_root is empty with data.source=image_folder; "
                "give a folder with one sub-folder per class"]
    try:
        found = len(class_names(root))
    except FileNotFoundError as exc:
        return [str(exc)]
    if found != num_classes:
        return [f"model.num_classes({num_classes}) != {found} class sub-folders under "
                f"data.image_root; set model.num_classes={found}"]
    return []


RECIPE = registry.register(registry.Recipe(
    name="vit", config=ViTConfig, build=build, loss=loss, data=data, checks=checks,
    units="images", units_per_sample=lambda model_cfg: 1, eval_summary=eval_summary))
