"""DiT checkpoint conversion: the official `transformer/` folder (diffusers `GlmImageTransformer2DModel`).

`GlmImageDiT` mirrors the official module names, so the key map is the identity; `from_official` /
`to_official` still exist (and copy the dict) so that every component converts the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from glimage.checkpoint import build_on_meta, load_strict, read_config, read_state_dict, save_state_dict, write_json
from glimage.config import DiTConfig
from glimage.models.dit import GlmImageDiT
from glimage.validate import InputError

CLASS_NAME = "GlmImageTransformer2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# The reference constructor's defaults: a config.json that omits a key gets these (not the GLM-Image values
# that DiTConfig defaults to -- e.g. attention_head_dim 40, num_attention_heads 64 here).
REFERENCE_DEFAULTS = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=40,
                          num_attention_heads=64, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
                          prior_vq_quantizer_codebook_size=16384)


def config_from_official(d: dict) -> DiTConfig:
    """`transformer/config.json` -> DiTConfig. Keys the reference class does not take (`_diffusers_version`,
    legacy entries) are ignored, as diffusers does."""
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise InputError(f"transformer config is for {name!r}, expected {CLASS_NAME!r}")
    values = {}
    for f in dataclasses.fields(DiTConfig):
        value = d.get(f.name, REFERENCE_DEFAULTS[f.name])
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"transformer config {f.name} must be a positive integer, got {value!r}")
        values[f.name] = value
    return DiTConfig(**values)


def config_to_official(cfg: DiTConfig) -> dict:
    return {"_class_name": CLASS_NAME, **dataclasses.asdict(cfg)}


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sd)


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sd)


def load_dit(folder: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> GlmImageDiT:
    """Build on meta from `folder/config.json`, then assign the checkpoint's tensors (strict)."""
    folder = Path(folder)
    cfg = read_config(folder / "config.json", config_from_official)
    model = build_on_meta(lambda: GlmImageDiT(cfg), f"{folder}/config.json")
    sd = from_official(read_state_dict(folder, device, dtype))
    return load_strict(model, sd, f"DiT checkpoint {folder}")


def save_dit(model: GlmImageDiT, folder: str | os.PathLike) -> None:
    """config.json + diffusion_pytorch_model.safetensors in the official layout (sharded above 5 GiB)."""
    folder = Path(folder)
    write_json(folder / "config.json", config_to_official(model.cfg))
    save_state_dict(to_official(model.state_dict()), folder, WEIGHTS_NAME)
