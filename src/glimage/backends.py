"""The one place that chooses between the PyTorch and the MindSpore backend, above both.

The MindSpore pipeline and trainer are built on the PyTorch ones (the same prompts, sampling, schedule and run
loop, with MindSpore computing the models), so they import them; nothing below this module imports back.
    glimage.from_pretrained(path, backend="mindspore")  # = MindSporePipeline.from_pretrained(path)
"""

from __future__ import annotations

import os

from .validate import check_choice

BACKENDS = ("torch", "mindspore")


def pipeline_class(backend: str = "torch") -> type:
    """GlmImagePipeline, or MindSporePipeline (its subclass with MindSpore models) for backend="mindspore"."""
    if check_choice("backend", backend, BACKENDS) == "mindspore":
        from .mindspore.pipeline import MindSporePipeline
        return MindSporePipeline
    from .pipeline import GlmImagePipeline
    return GlmImagePipeline


def from_pretrained(path: str | os.PathLike | None = None, backend: str = "torch", **kwargs):
    """An official GLM-Image folder (no path: the shipped model) in the chosen backend; kwargs as
    GlmImagePipeline.from_pretrained (device, dtype, offload, ar_device)."""
    return pipeline_class(backend).from_pretrained(path, **kwargs)


def from_config(cfg, backend: str = "torch", **kwargs):
    """A preset (or GlmImageConfig) with random weights in the chosen backend; kwargs as
    GlmImagePipeline.from_config (seed, device, dtype)."""
    return pipeline_class(backend).from_config(cfg, **kwargs)


def train(cfg, **kwargs) -> str:
    """`glimage train`: glimage.train.loop.train, or glimage.mindspore.train.train for cfg.backend="mindspore"
    (the same run with MindSpore computing the model); returns the export folder."""
    if check_choice("backend", cfg.backend, BACKENDS) == "mindspore":
        from .mindspore.train import train as train_mindspore
        return train_mindspore(cfg, **kwargs)
    from .train.loop import train as train_torch
    return train_torch(cfg, **kwargs)
