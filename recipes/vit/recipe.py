"""The ViT recipe: config schema, model builder (megatron-core ``CLIPViTModel`` + class-token
head, built per pipeline stage), batch -> loss with top-1 counts, and image data (digits or an
image folder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mptk.config import registry
from mptk.config.schema import DataSource, ModelConfig, RunConfig
from mptk.config.shape import Embedding, Head, Shape, transformer

if TYPE_CHECKING:  # torch and megatron load with the model, not with the config (mptk-plan)
    import torch

    from mptk.recipes.vit.model import ViTClassifier


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
    """(image_size / patch_size)**2 patches + 1 class token; pp>1 sends [seq_length, micro
    batch, hidden] between stages, so preflight requires it to match there."""


def tokens_of(m: ViTConfig) -> int:
    """Sequence length the backbone runs: the patches plus the class token."""
    return (m.image_size // m.patch_size) ** 2 + 1


def shape(cfg: ViTConfig) -> Shape:
    """The cost model's view: the patch embedding (with class token and positions) in front,
    a class head on the class token behind, over patches + 1 positions."""
    return transformer(cfg, seq=tokens_of(cfg), learned_pos=True, embedding=Embedding.patches,
                       patch_inputs=cfg.channels * cfg.patch_size ** 2, head=Head.classes,
                       classes=cfg.num_classes)


def build(cfg: ViTConfig, ctx: registry.ModelContext) -> ViTClassifier:
    """This stage's part of the classifier (the whole of it at pp=1; tensor parallel inside
    the transformer layers)."""
    from mptk.models import megatron
    from mptk.recipes.vit.model import ViTClassifier

    config = megatron.config_for(cfg, ctx)
    if ctx.pp > 1:  # held-out batches split the whole split (sizes differ from the micro batch
        # and by one between batches): stages exchange each tensor's shape before sending it
        config = megatron.replace(config, variable_seq_lengths=True,
                                  moe_token_dispatcher_type="alltoall")  # megatron requires it
    return ViTClassifier(cfg, config, pre_process=ctx.pre_process,
                         post_process=ctx.post_process, vp_stage=ctx.vp_stage)


def forward(model: ViTClassifier, batch: dict):
    """This stage's output (logits on the last stage) and the function reducing logits to
    ``(mean cross-entropy, top-1 counts as sums)`` — the pipeline schedule calls the latter on
    the last stage only."""
    labels = batch["labels"]

    def reduce(logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        import torch.nn.functional as F

        logits = logits.float()
        correct = (logits.argmax(-1) == labels).sum().detach()  # no sync; the loop sums it
        return F.cross_entropy(logits, labels), {"correct": correct, "samples": labels.numel()}

    return model(batch["images"]), reduce


def loss(model: ViTClassifier, batch: dict) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the micro-batch; top-1 counts as sums."""
    output, reduce = forward(model, batch)
    return reduce(output)


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
    sp = ["model.recipe=vit: parallel.sp=true is not supported (its class-token sequence is not "
          "split over tp); set parallel.sp=false"] if cfg.parallel.sp else []
    return [*_image_checks(cfg.model), *_layout_checks(cfg), *_data_checks(cfg), *sp]


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
    """pp>1 sends [model.seq_length, micro batch, hidden] between stages."""
    m, want = cfg.model, tokens_of(cfg.model)
    if cfg.parallel.pp == 1 or m.seq_length == want or _image_checks(m):
        return []
    return [f"model.seq_length({m.seq_length}) must be (image_size/patch_size)**2 + 1 = {want} "
            f"at parallel.pp({cfg.parallel.pp}) (the tensor sent between stages); set "
            f"model.seq_length={want}"]


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


def example_batch(cfg: ViTConfig, micro: int, generator: torch.Generator) -> dict:
    """Random images of the model's size and channels, random labels."""
    import torch

    images = torch.rand(micro, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    return {"images": images, "labels": torch.randint(0, cfg.num_classes, (micro,), generator=generator)}


RECIPE = registry.register(registry.Recipe(
    name="vit", config=ViTConfig, build=build, loss=loss, forward=forward, data=data,
    checks=checks, units="images", units_per_sample=lambda model_cfg: 1,
    eval_summary=eval_summary, shape=shape, example_batch=example_batch))
