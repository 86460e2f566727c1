"""KL autoencoder (the diffusers `AutoencoderKL` of GLM-Image's `vae/` folder), written out plainly.

Image (B, 3, H, W) in [-1, 1]  ->  encoder  ->  (B, 2*C, H/8, W/8) = [mean | logvar]  ->  posterior
latent (B, C, H/8, W/8)        ->  decoder  ->  image (B, 3, H, W)

Module names are diffusers' (`encoder.down_blocks.{i}.resnets.{j}.conv1`, `decoder.up_blocks.{i}.upsamplers.0.conv`,
...), so the official state dict loads with an identity key map. The official VAE has no `quant_conv` /
`post_quant_conv` and no mid-block attention; the attention is supported here (cheap) so other configs load too.

The diffusion model works on *normalized* latents: `normalize_latents(z) = (z - mean) / std` after encoding and
`denormalize_latents(z) = z * std + mean` before decoding, with the per-channel statistics of `vae/config.json`
(`latents_mean` / `latents_std`, exactly the pipeline's formula; `scaling_factor` is unused by GLM-Image).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from glimage.config import VAEConfig

EPS = 1e-6  # every GroupNorm of the diffusers VAE uses eps 1e-6


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus a 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in the reference)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # reference divides by output_scale_factor = 1.0: a no-op


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # diffusers' VAE uses downsample_padding=0 plus an asymmetric zero pad on the right/bottom only
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head spatial self-attention of the mid block (diffusers `Attention(_from_deprecated_attn_block)`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0` (to_out.1 is a dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.reshape(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/sqrt(C), like the reference
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        # diffusers keeps a ModuleList([None]) when attention is off; no parameters either way
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1)
            for i in range(n)])
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], g, cfg.mid_block_add_attention)
        # the decoder has one more resnet per level than the encoder (diffusers: layers_per_block + 1)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian(NamedTuple):
    """The posterior q(z|x); unpacks as `mean, logvar = vae.encode(x)`. logvar is already clamped to [-30, 20]."""

    mean: torch.Tensor  # (B, C, h, w)
    logvar: torch.Tensor  # (B, C, h, w)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        return self.mean + self.std * _randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w), as diffusers' `DiagonalGaussianDistribution.kl()`."""
        return 0.5 * torch.sum(self.mean.pow(2) + torch.exp(self.logvar) - 1.0 - self.logvar, dim=[1, 2, 3])


def _randn(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' `randn_tensor`: a CPU generator draws on the CPU (then moves), a list draws per sample."""
    gens = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    gen_device = gens[0].device if gens[0] is not None else device
    draw_device = torch.device("cpu") if gen_device.type == "cpu" else device
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=draw_device, dtype=dtype).to(device)
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype)
                      for g in gens]).to(device)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        for name in ("latents_mean", "latents_std"):
            stats = getattr(cfg, name)
            if stats is not None and len(stats) != cfg.latent_channels:
                raise ValueError(f"{name} has {len(stats)} values, expected latent_channels={cfg.latent_channels}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, latent_channels, ceil(H/8), ceil(W/8))."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected images (B, {self.cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, torch.clamp(logvar, -30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: raw (denormalized) latents (B, latent_channels, h, w) -> images (B, out_channels, 8h, 8w)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (B, {self.cfg.latent_channels}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.latents_mean is None and self.cfg.latents_std is None:
            return None
        C = self.cfg.latent_channels
        # Like the pipeline: an fp32 tensor from the python floats, then cast to the latents' dtype.
        mean = torch.tensor(self.cfg.latents_mean if self.cfg.latents_mean is not None else [0.0] * C)
        std = torch.tensor(self.cfg.latents_std if self.cfg.latents_std is not None else [1.0] * C)
        return (mean.view(1, C, 1, 1).to(z.device, z.dtype), std.view(1, C, 1, 1).to(z.device, z.dtype))

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the DiT's latent space: (z - mean) / std (identity without statistics)."""
        stats = self._stats(z)
        return z if stats is None else (z - stats[0]) / stats[1]

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latent space -> raw VAE latents: z * std + mean (identity without statistics)."""
        stats = self._stats(z)
        return z if stats is None else z * stats[1] + stats[0]
