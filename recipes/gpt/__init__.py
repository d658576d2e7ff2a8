"""GPT: a decoder-only language model on megatron-core's ``GPTModel``."""

from recipes.gpt.recipe import RECIPE, GPTConfig  # noqa: F401  (registers the recipe)
