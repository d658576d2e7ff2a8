"""ViT: an image classifier on megatron-core's ``CLIPViTModel`` backbone."""

from mptk.recipes.vit.recipe import RECIPE, ViTConfig  # noqa: F401  (registers the recipe)
