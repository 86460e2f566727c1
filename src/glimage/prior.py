"""The AR stage of the pipeline: prompts (+ source images) -> semantic-VQ prior tokens for the decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .image import preprocess_source
from .models.ar import GlmImageAR
from .prompt import GlmTokenizer, build_prompts
from .sampling import generate_grid_tokens
from .timing import NO_TIMER
from .validate import InputError, check_target_size


@dataclass
class Prior:
    ids: torch.Tensor  # (B, 4*th*tw) large grid upsampled x2: one id per DiT patch
    grid: tuple[int, int]  # (th, tw) of the large grid
    tokens: torch.Tensor  # (B, n_grid) everything generated (preview grid first for text-to-image)
    source_ids: list[list[torch.Tensor]] | None  # [b][i]: (2gh*2gw,) upsampled ids of source image i
    source_grids: list[list[tuple[int, int]]] | None  # [b][i]: (gh, gw) VQ grid of source image i


def upsample_ids(ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w) -> (B, 4*h*w): nearest x2 upsampling of a row-major grid (the reference interpolates floats)."""
    grid = ids.view(-1, h, w).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return grid.reshape(ids.shape[0], -1)


def normalize_images(image, batch: int) -> list[list] | None:
    """None | image | [images] (batch 1) | [[images] per prompt] -> [[images] per prompt] or None."""
    if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
        return None
    if not isinstance(image, (list, tuple)):
        image = [image]
    if not isinstance(image[0], (list, tuple)):
        if batch != 1:
            raise InputError(f"with {batch} prompts, give one list of source images per prompt")
        return [list(image)]
    if len(image) != batch:
        raise InputError(f"{len(image)} lists of source images for {batch} prompts")
    counts = [len(x) for x in image]
    if len(set(counts)) != 1:
        raise InputError(f"every prompt needs the same number of source images, got {counts}")
    return [list(x) for x in image]


@torch.no_grad()
def tokenize_sources(model: GlmImageAR, images: list[list]) -> list[list[torch.Tensor]]:
    """[b][i] images -> [b][i] VQ id grids (gh, gw); images of one size share one ViT batch."""
    cfg = model.cfg
    device, dtype = model.device, model.dtype
    pixels = [[preprocess_source(im, cfg.vision.patch_size, cfg.source_min_pixels, cfg.source_max_pixels,
                                 cfg.max_aspect_ratio) for im in row] for row in images]
    flat = [(b, i) for b, row in enumerate(pixels) for i in range(len(row))]
    out: list[list] = [[None] * len(row) for row in pixels]
    by_size: dict[tuple, list] = {}
    for b, i in flat:
        by_size.setdefault(tuple(pixels[b][i].shape), []).append((b, i))
    for members in by_size.values():
        x = torch.stack([pixels[b][i] for b, i in members]).to(device, dtype)
        ids = model.image_ids(x)  # (n, gh, gw)
        for (b, i), g in zip(members, ids):
            out[b][i] = g
    return out


def run_prior(model: GlmImageAR, tok: GlmTokenizer, prompts: list[str], height: int, width: int,
              images: list[list] | None, generator: torch.Generator, progress: bool = True,
              timer=NO_TIMER, step=None, should_stop=None) -> Prior:
    cfg = model.cfg
    check_target_size(height, width, cfg, text_to_image=not images)
    with timer("ar_vit"):
        src = tokenize_sources(model, images) if images else None
    grids = [[tuple(g.shape) for g in row] for row in src] if src else None
    batch = build_prompts(prompts, height, width, tok, cfg, grids)
    if src:
        flat = torch.cat([g.flatten() for row in src for g in row]).cpu()
        slots = batch.input_ids == tok.image_id
        if int(slots.sum()) != flat.numel():
            raise InputError(f"prompt has {int(slots.sum())} image slots for {flat.numel()} image tokens")
        batch.input_ids = batch.input_ids.masked_scatter(slots, flat)
    tokens = generate_grid_tokens(model, batch, cfg.temperature, cfg.top_k, cfg.top_p, generator, progress, timer,
                                  step, should_stop)
    th, tw = batch.large_grid
    large = tokens[:, batch.large_offset: batch.large_offset + th * tw]
    src_up = [[upsample_ids(g.reshape(1, -1), *g.shape)[0] for g in row] for row in src] if src else None
    return Prior(upsample_ids(large, th, tw), (th, tw), tokens, src_up, grids)
