"""GPT: a decoder-only language model on megatron-core's ``GPTModel``."""

from mptk.recipes.gpt.recipe import RECIPE, GPTConfig  # noqa: F401  (registers the recipe)
