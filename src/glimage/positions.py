"""3-axis MRoPE positions (t, h, w) of GLM-Image's AR sequence, computed once on the host before decoding.

Layout rules (reference: transformers `GlmImageModel.get_rope_index`):
- text tokens: position p on all three axes, a ramp that continues across the sequence;
- a source image's gh*gw tokens (between an image-start and an image-end token): t = s, h = s + row,
  w = s + col, where s is the next free position; then s advances by max(gh, gw) (not by gh*gw);
- the grids to be generated, in reverse list order (text-to-image: the preview grid, then the large
  grid), likewise starting at the first free position after the prompt; a final (d, d, d) entry follows
  for the end-of-image token.
The reference computes the decode positions inside the model with host syncs and keeps them in module
state; here they are a plain (3, n_new) tensor per sample, indexed by step in the decode loop.
"""

from __future__ import annotations

import torch


def grid_positions(start: int, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.full((h * w,), start), start + rows, start + cols])  # (3, h*w)


def prompt_positions(ids: list[int], source_grids: list[tuple[int, int]], image_start: int, image_end: int):
    """Positions (3, L) of one unpadded prompt, and the next free position."""
    chunks, pos, i, n_img = [], 0, 0, 0
    L = len(ids)
    while i < L:
        if ids[i] == image_start and n_img < len(source_grids) and image_end in ids[i + 1:]:
            gh, gw = source_grids[n_img]
            # the start token itself is text
            chunks.append(torch.full((3, 1), pos))
            pos += 1
            chunks.append(grid_positions(pos, gh, gw))
            pos += max(gh, gw)
            i += 1 + gh * gw
            if i >= L or ids[i] != image_end:
                raise ValueError(f"source image {n_img} should span {gh}x{gw} tokens before its end token")
            n_img += 1
            continue
        chunks.append(torch.full((3, 1), pos))
        pos += 1
        i += 1
    if n_img != len(source_grids):
        raise ValueError(f"prompt holds {n_img} source image spans but {len(source_grids)} grids were given")
    return torch.cat(chunks, dim=1), pos


def decode_positions(start: int, grids: list[tuple[int, int]]) -> torch.Tensor:
    """Positions (3, sum(h*w) + 1) of the tokens to generate, grids given in generation order."""
    chunks, d = [], start
    for h, w in grids:
        chunks.append(grid_positions(d, h, w))
        d += max(h, w)
    chunks.append(torch.full((3, 1), d))  # end-of-image marker
    return torch.cat(chunks, dim=1)
