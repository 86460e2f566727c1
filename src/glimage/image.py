"""Source-image preprocessing for the semantic-VQ tokenizer, identical to the reference's PIL processor.

smart_resize (reference `image_processing_pil_glm_image.smart_resize`): scale so the short side reaches
sqrt(min_pixels) and the long side stays within sqrt(max_pixels), then *halve* both sides and round to the
patch size: the ViT sees the image at half resolution, so its 16-px patch grid is the source size / 32.
Then bicubic resize on uint8 (PIL), rescale to [0, 1], normalise with mean = std = 0.5.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def load_image(image) -> Image.Image:
    """A PIL image, a path, or an (H, W, 3) uint8 array -> RGB PIL image, with a clear error otherwise."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.copy()
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: file not found") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: not a readable image ({e})") from e
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 max_aspect: float = 4.0) -> tuple[int, int]:
    if height < factor or width < factor:
        raise ValueError(f"source image {width}x{height} is too small: both sides must be at least {factor} px")
    if max(height, width) / min(height, width) > max_aspect:
        raise ValueError(f"source image {width}x{height} has aspect ratio "
                         f"{max(height, width) / min(height, width):.2f}, above the maximum {max_aspect:g}")
    shortest, longest = int(round(math.sqrt(min_pixels))), int(round(math.sqrt(max_pixels)))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    height, width = height // 2, width // 2
    h = max(factor, int(round(height * scale / factor)) * factor)
    w = max(factor, int(round(width * scale / factor)) * factor)
    if max(h, w) > longest:
        beta = max(h, w) / longest
        h = max(factor, int(math.floor((h / beta) / factor)) * factor)
        w = max(factor, int(math.floor((w / beta) / factor)) * factor)
    return h, w


def preprocess_source(image, patch: int, min_pixels: int, max_pixels: int, max_aspect: float = 4.0) -> torch.Tensor:
    """-> (3, h, w) float32 in [-1, 1], h and w multiples of `patch`."""
    image = load_image(image)
    h, w = smart_resize(image.height, image.width, patch, min_pixels, max_pixels, max_aspect)
    arr = np.asarray(image.resize((w, h), Image.BICUBIC))
    # float64 rescale then float32, as numpy does in the reference
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
