"""Datasets that ship with glimage: the synthetic `shapes` set (`glimage data shapes`)."""

from .shapes import COLORS, HELD_OUT, SHAPES, TEMPLATES, eval_prompts, generate_shapes

__all__ = ["COLORS", "HELD_OUT", "SHAPES", "TEMPLATES", "eval_prompts", "generate_shapes"]
