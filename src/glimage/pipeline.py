"""`GlmImagePipeline`: the official checkpoint folder -> images, with diffusers' argument names."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ARConfig
from .convert.ar import load_ar
from .device import manual_generator, resolve_device, resolve_dtype
from .models.ar import GlmImageAR
from .prior import normalize_images, run_prior
from .prompt import GlmTokenizer


def seed_generator(generator, seed, device: torch.device) -> torch.Generator:
    """The AR sampler's generator. Like the reference, a given torch.Generator contributes its *initial*
    seed (the reference re-seeds the global RNG with it); we seed a private generator instead of the
    global one, which draws the same numbers."""
    if generator is not None and seed is not None:
        raise ValueError("give either generator or seed, not both")
    if isinstance(generator, (list, tuple)):
        generator = generator[0]
    if generator is not None:
        seed = generator.initial_seed()
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return manual_generator(device, seed)


class GlmImagePipeline:
    def __init__(self, ar: GlmImageAR, tokenizer: GlmTokenizer, device: torch.device):
        self.ar = ar
        self.tokenizer = tokenizer
        self.device = device
        self.progress = True

    @property
    def ar_config(self) -> ARConfig:
        return self.ar.cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "GlmImagePipeline":
        path = Path(path)
        if not (path / "vision_language_encoder").is_dir():
            raise FileNotFoundError(f"{path} is not a GLM-Image folder (no vision_language_encoder/)")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        ar = load_ar(path, device, dtype)
        return cls(ar, GlmTokenizer.from_folder(path / "processor"), device)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    @torch.no_grad()
    def generate_prior_tokens(self, prompt: str | list[str], height: int, width: int, image=None,
                              generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """The large grid's ids, upsampled x2 (one per DiT patch): (B, 4 * H/32 * W/32)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        g = seed_generator(generator, seed, self.device)
        prior = run_prior(self.ar, self.tokenizer, prompts, height, width, normalize_images(image, len(prompts)), g,
                          self.progress)
        return prior.ids
