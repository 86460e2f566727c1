"""The contract between the training loop (loop.py) and a stage (stages/*.py).

A stage knows its model, data and loss; the loop knows nothing of GLM-Image. It owns the optimizer, FSDP2,
activation checkpointing, gradient accumulation, clipping, logging, checkpoints and resume, and applies the
same code path for one process and for many.

Loss normalisation: `loss` returns the *sum* of per-element losses of its micro-batch and the number of
elements (tokens, pixels, samples: the stage decides). The loop all-reduces the counts of the whole global
batch (every rank, every accumulation step) and back-propagates sum / global_count, so any split of one
global batch over ranks and accumulation steps gives the same gradient.

Randomness: every random choice a stage makes (noise, timesteps, condition dropout, crops) comes from the
`torch.Generator` the loop passes, seeded from (seed, step, micro-step, rank-independent sample index):
runs resume exactly and do not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # scalar, sum over this micro-batch's elements (differentiable)
    count: torch.Tensor  # scalar, number of elements in loss_sum (float)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra sums, normalised by count in logs


class Stage(Protocol):
    name: str

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load/move the frozen helpers (VAE, glyph encoder, VQ tokenizer) to the device, under no_grad use."""

    def build(self) -> nn.Module:
        """The trainable module, initialised (from scratch or from `init`), on the CPU in fp32."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Units that FSDP2 shards and activation checkpointing wraps (transformer blocks, VAE levels)."""

    def dataset(self) -> "torch.utils.data.Dataset":
        """Map-style; `__getitem__` returns a sample dict, or None for a corrupt/unusable sample (counted)."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        ...

    def step(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        ...

    def export(self, model: nn.Module, out_dir: str) -> None:
        """Write the official checkpoint layout (loadable by GlmImagePipeline.from_pretrained / the reference)."""

    def samples(self, model: nn.Module, out_dir: str, step: int) -> None:
        """Optional: write sample images for image stages."""
