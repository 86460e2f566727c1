"""Source-image preprocessing for the semantic-VQ tokenizer, identical to the reference's PIL processor.

smart_resize (reference `image_processing_pil_glm_image.smart_resize`): scale so the short side reaches
sqrt(min_pixels) and the long side stays within sqrt(max_pixels), then *halve* both sides and round to the
patch size: the ViT sees the image at half resolution, so its 16-px patch grid is the source size / 32.
Then bicubic resize on uint8 (PIL), rescale to [0, 1], normalise with mean = std = 0.5.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .validate import MAX_SOURCE_PIXELS, InputError


def load_image(image, name: str = "image", formats: tuple[str, ...] | None = None) -> Image.Image:
    """A PIL image, a path, encoded bytes (an upload) or an (H, W[, C]) uint8 array -> an RGB PIL image.

    Refused with a clear error: a missing file, a directory, data that is not an image, a truncated file, and
    anything above MAX_SOURCE_PIXELS (checked from the header, before the pixels are decoded). Transparency is
    composited onto white, as the reference's image processor does; 16-bit and float greyscale are scaled
    to 8 bits (PIL's plain conversion clips them, and the reference then sees a white image). `formats`
    limits the file formats PIL may try (a server takes PNG, JPEG and WebP: no other decoder is reached).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise InputError(f"{name} {str(path)!r} is a directory, not an image file", name)
        if not path.exists():
            raise InputError(f"{name} {str(path)!r}: no such file", name)
        image = _decode(path, f"{name} {str(path)!r}", name, formats)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _decode(io.BytesIO(bytes(image)), name, name, formats)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise InputError(f"{name}: an array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got "
                             f"{image.dtype} {image.shape}", name)
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise InputError(f"{name} must be a PIL image, a path, image bytes or a uint8 array, got "
                         f"{type(image).__name__}", name)
    _check_pixels(image.size, name, name)
    return to_rgb(image)


def _check_pixels(size: tuple[int, int], what: str, param: str) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_SOURCE_PIXELS:
        raise InputError(f"{what} is {w}x{h} = {w * h / 1e6:.1f} Mpx; source images must have between 1 px and "
                         f"{MAX_SOURCE_PIXELS / 1e6:.0f} Mpx (e.g. 8192x8192): downscale it first", param)


def image_size(data: bytes, name: str, formats: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(width, height) of encoded image bytes from the header alone: the format and pixel count are checked,
    no pixel is decoded."""
    return _decode(io.BytesIO(data), name, name, formats, load=False)


def _decode(src, what: str, param: str, formats=None, load: bool = True):
    try:
        with Image.open(src, formats=formats) as im:
            _check_pixels(im.size, what, param)  # from the header: nothing decoded yet
            if not load:
                return im.size
            im.load()
            return im.copy()
    except Image.DecompressionBombError as e:  # PIL refuses to open it: its message has the pixel count only
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.1f} Mpx" if found else "too large"
        raise InputError(f"{what} is {size} (a decompression bomb?); source images must have at most "
                         f"{MAX_SOURCE_PIXELS / 1e6:.0f} Mpx (e.g. 8192x8192): downscale it first", param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, InputError):
            raise
        reason = f"broken image ({e})"
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image file PIL can read"
            if formats:
                names = " or ".join([", ".join(formats[:-1]), formats[-1]] if len(formats) > 1 else formats)
                reason = f"not an image in {names} format"
        raise InputError(f"cannot read {what}: {reason}", param) from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max(initial=0.0)
        # 16-bit range -> 8 bits; float images in [0, 1] -> [0, 255]; 8-bit values stay
        scale = 255.0 if image.mode == "F" and top <= 1.0 else (1 / 257 if top > 255 else 1.0)
        image = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # the reference processor's convert_to_rgb: alpha composited onto white
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 max_aspect: float = 4.0) -> tuple[int, int]:
    if height < factor or width < factor:
        raise InputError(f"source image {width}x{height} is too small: both sides must be at least {factor} px")
    if max(height, width) / min(height, width) > max_aspect:
        raise InputError(f"source image {width}x{height} has aspect ratio "
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
