"""The official checkpoint folder -> MindSpore models, strictly, through the same configs and key maps as the
PyTorch path (glimage.convert): every tensor used, none missing, every shape checked. Tensors are read as
numpy arrays (checkpoint.read_arrays: bf16 included), never through torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..checkpoint import CheckpointError, list_head, read_arrays, read_config
from ..convert import ar as conv_ar
from ..convert import dit as conv_dit
from ..convert import glyph as conv_glyph
from ..convert import vae as conv_vae
from .ar import GlmImageAR
from .dit import GlmImageDiT
from .glyph import GlyphEncoder
from .vae import AutoencoderKL

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def assign(cell: nn.Cell, arrays: dict[str, np.ndarray], what: str = "checkpoint", dtype=ms.float32) -> nn.Cell:
    """Set every parameter of `cell` from `arrays` (names as the torch module's state dict), strictly."""
    params = dict(cell.parameters_and_names())
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    shapes = [f"{k}: checkpoint {tuple(arrays[k].shape)} vs model {tuple(params[k].shape)}"
              for k in sorted(set(params) & set(arrays)) if tuple(arrays[k].shape) != tuple(params[k].shape)]
    problems = [f"{len(m)} {kind} tensor(s): {list_head(m)}" for m, kind in
                ((missing, "missing"), (extra, "unexpected"), (shapes, "misshaped")) if m]
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))
    for name, p in params.items():
        p.set_data(Tensor(np.ascontiguousarray(arrays[name], dtype=np.float32)).astype(dtype))
    return cell


def state_arrays(cell: nn.Cell) -> dict[str, np.ndarray]:
    """The cell's parameters as fp32 numpy arrays, named like the torch module's state dict."""
    return {name: p.astype(ms.float32).asnumpy() for name, p in cell.parameters_and_names()}


def from_torch(cell: nn.Cell, module, dtype=ms.float32) -> nn.Cell:
    """Copy a torch module's weights (the same architecture) into `cell`: tests, and training's initialisation."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}
    return assign(cell, sd, f"torch {type(module).__name__}", dtype)


def load_ar(root: str | os.PathLike, dtype=ms.float32) -> GlmImageAR:
    cfg = conv_ar.read_ar_config(root)
    arrays = conv_ar.from_official(read_arrays(Path(root) / "vision_language_encoder"))
    return assign(GlmImageAR(cfg), arrays, f"{root}/vision_language_encoder", dtype)


def load_glyph_encoder(folder: str | os.PathLike, dtype=ms.float32) -> GlyphEncoder:
    cfg = read_config(Path(folder) / "config.json", conv_glyph.config_from_official)  # checks gated-gelu
    return assign(GlyphEncoder(cfg), conv_glyph.from_official(read_arrays(folder)), f"text_encoder {folder}", dtype)


def load_dit(folder: str | os.PathLike, dtype=ms.float32) -> GlmImageDiT:
    cfg = read_config(Path(folder) / "config.json", conv_dit.config_from_official)
    return assign(GlmImageDiT(cfg), conv_dit.from_official(read_arrays(folder)), f"DiT checkpoint {folder}", dtype)


def load_vae(folder: str | os.PathLike, dtype=ms.float32) -> AutoencoderKL:
    cfg = read_config(Path(folder) / "config.json", conv_vae.config_from_official)
    return assign(AutoencoderKL(cfg), conv_vae.from_official(read_arrays(folder)), f"VAE checkpoint {folder}", dtype)
