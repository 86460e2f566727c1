"""The VAE folder (`vae/`: diffusers `config.json` + `diffusion_pytorch_model.safetensors`) <-> `AutoencoderKL`.

Our module names are diffusers' own, so the state-dict conversion is the identity (kept as functions so every
component converts the same way). The per-channel `latents_mean` / `latents_std` exist only in
`vae/config.json`; they are read into `VAEConfig` and written back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glimage.checkpoint import build_on_meta, load_strict, read_config, read_state_dict, save_state_dict, write_json
from glimage.config import VAEConfig
from glimage.models.vae import AutoencoderKL
from glimage.validate import InputError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def config_from_official(d: dict) -> VAEConfig:
    """diffusers `AutoencoderKL` config dict -> VAEConfig; rejects variants this implementation does not build."""
    n = len(d["block_out_channels"])
    # (supported value, diffusers' default when the key is absent)
    required = {
        "down_block_types": (["DownEncoderBlock2D"] * n, ["DownEncoderBlock2D"]),
        "up_block_types": (["UpDecoderBlock2D"] * n, ["UpDecoderBlock2D"]),
        "act_fn": ("silu", "silu"),
        "use_quant_conv": (False, True),  # the official VAE has no quant convs; diffusers' default has them
        "use_post_quant_conv": (False, True),
    }
    for key, (want, default) in required.items():
        got = d.get(key, default)
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise InputError(f"unsupported VAE config: {key}={got!r} (supported: {want!r})")
    if d.get("shift_factor") is not None:
        raise InputError(f"unsupported VAE config: shift_factor={d['shift_factor']!r} (GLM-Image uses latents_mean)")
    mean, std = d.get("latents_mean"), d.get("latents_std")
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        block_out_channels=tuple(d["block_out_channels"]),
        layers_per_block=d.get("layers_per_block", 1),
        norm_num_groups=d.get("norm_num_groups", 32),
        mid_block_add_attention=d.get("mid_block_add_attention", True),
        latents_mean=tuple(float(x) for x in mean) if mean is not None else None,
        latents_std=tuple(float(x) for x in std) if std is not None else None,
    )


def config_to_official(cfg: VAEConfig) -> dict:
    """VAEConfig -> a config.json that diffusers' `AutoencoderKL.from_pretrained` accepts (unset fields default)."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "mid_block_add_attention": cfg.mid_block_add_attention,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
        "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
    }


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sd)  # identical names


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(sd)


def load_vae(folder: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> AutoencoderKL:
    cfg = read_config(Path(folder) / "config.json", config_from_official)
    model = build_on_meta(lambda: AutoencoderKL(cfg), f"{Path(folder)}/config.json")
    load_strict(model, from_official(read_state_dict(folder, device, dtype)), what=f"VAE checkpoint {folder}")
    return model.eval()


def save_vae(model: AutoencoderKL, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    write_json(folder / "config.json", config_to_official(model.cfg))
    save_state_dict(to_official(model.state_dict()), folder, WEIGHTS)
