"""The ViT recipe's model: megatron-core's ``CLIPViTModel`` backbone with a class-token head,
built per pipeline stage. Apart from :mod:`recipe` so that reading the recipe's config (the
planner, Hydra's schemas) imports neither torch nor megatron."""

from __future__ import annotations

import torch
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mptk.compat import cpu
from mptk.config.schema import AttentionImpl
from mptk.models.attention import SdpaAttention
from mptk.recipes.vit.recipe import ViTConfig


def layer_spec(cfg: ViTConfig) -> ModuleSpec:
    """megatron's local ViT layer, bidirectional (the stock local spec is causal)."""
    spec = get_vit_layer_with_local_spec()
    attention = spec.submodules.self_attention
    if cfg.attention is AttentionImpl.sdpa:
        attention.submodules.core_attention = SdpaAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    return spec


class ViTClassifier(MegatronModule):
    """One pipeline stage of the classifier (the whole model at pp=1): the patch embedding
    (first stage), its share of the megatron ViT layers, then norm + linear on the class
    token (last stage). Parameter names: ``backbone.*``, ``norm.*``, ``head.*``.

    A ``MegatronModule``, so dist-checkpointing can shard its weights like GPT's. Stages drop
    the parts they do not run: unused parameters break DeepSpeed's ZeRO gradient hooks.
    """

    def __init__(self, cfg: ViTConfig, config: TransformerConfig, pre_process: bool = True,
                 post_process: bool = True, vp_stage: int | None = None):
        super().__init__(config=config)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        with cpu.device_scope():  # CLIPViTModel puts its position ids on CUDA (.cuda())
            self.backbone = CLIPViTModel(
                config, layer_spec(cfg), ln_pre_impl=WrappedTorchNorm, add_class_token=True,
                class_token_len=1, patch_dim=cfg.patch_size, img_h=cfg.image_size,
                img_w=cfg.image_size, model_subtype="clip", vp_stage=vp_stage)
        self.backbone.decoder.pre_process = pre_process  # False: reads set_input_tensor's
        del self.backbone.position_ids  # CUDA at build time on a GPU; made per forward here
        if pre_process:  # CLIPViTModel hard-codes 3 input channels: follow the config
            self.backbone.conv1 = torch.nn.Conv2d(cfg.channels, cfg.hidden_size, cfg.patch_size,
                                                  stride=cfg.patch_size, bias=False,
                                                  dtype=config.params_dtype)
        else:
            for name in ("conv1", "class_token", "position_embeddings", "ln_pre"):
                delattr(self.backbone, name)
        if post_process:
            self.norm = WrappedTorchNorm(config, cfg.hidden_size, eps=config.layernorm_epsilon)
            self.head = torch.nn.Linear(cfg.hidden_size, cfg.num_classes,
                                        dtype=config.params_dtype)

    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's ``[s, b, h]`` (megatron's schedule passes a one-item list)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        assert len(input_tensor) == 1, "the ViT stage takes one input tensor"
        self.backbone.decoder.set_input_tensor(input_tensor[0])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, c, h, w]`` -> ``[s, b, h]`` exactly as ``CLIPViTModel.forward`` embeds:
        conv1 -> flatten -> class token first -> + position embeddings -> ln_pre."""
        vit = self.backbone
        x = vit.conv1(images.to(vit.conv1.weight.dtype))  # [b, h, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [b, grid**2, h]
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        assert x.shape[1] == vit.seq_length, f"{x.shape[1]} != {vit.seq_length}"
        positions = torch.arange(vit.seq_length, device=x.device)[None]
        x = vit.ln_pre(x + vit.position_embeddings(positions))
        return x.permute(1, 0, 2).contiguous()  # [s, b, h]; p2p needs contiguous

    def forward(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: ``[b, c, h, w]`` images; later stages read the received tensor.
        Returns ``[s, b, h]`` on stages before the last, ``[b, num_classes]`` logits on it."""
        hidden = self.embed(images) if self.pre_process else None
        hidden = self.backbone.decoder(hidden, attention_mask=None)
        if not self.post_process:
            return hidden.contiguous()
        return self.head(self.norm(hidden[0]))  # the class token
