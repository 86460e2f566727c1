"""The KL autoencoder in MindSpore: glimage.models.vae op for op (diffusers' AutoencoderKL names)."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from ..config import VAEConfig
from .layers import Conv2d, GroupNorm, Linear, attention

EPS = 1e-6


class ResnetBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x):
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))  # diffusers: zero pad right/bottom only


class Upsample2D(nn.Cell):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(ops.interpolate(x, scale_factor=2.0, mode="nearest", recompute_scale_factor=True))


class Attention(nn.Cell):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.CellList([Linear(channels, channels)])

    def construct(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.reshape(B, C, H * W)).swapaxes(1, 2)  # (B, HW, C)
        q, k, v = (p(h)[:, None] for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = self.to_out[0](attention(q, k, v)[:, 0])
        return x + h.swapaxes(1, 2).reshape(B, C, H, W)


class MidBlock2D(nn.Cell):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.CellList([Attention(channels, groups)]) if add_attention else None

    def construct(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, downsample):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if downsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, upsample):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if upsample else None

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1)
            for i in range(n)])
        self.mid_block = MidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock2D(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = GroupNorm(g, ch[-1], EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def construct(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Cell):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_mode(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior mean (B, C, h, w) (what image-to-image uses)."""
        return ops.chunk(self.encoder(x), 2, 1)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def _stats(self, z: Tensor):
        C = self.cfg.latent_channels
        mean = self.cfg.latents_mean if self.cfg.latents_mean is not None else [0.0] * C
        std = self.cfg.latents_std if self.cfg.latents_std is not None else [1.0] * C
        as_t = lambda s: Tensor(np.asarray(s, np.float32).reshape(1, C, 1, 1)).astype(z.dtype)  # noqa: E731
        return as_t(mean), as_t(std)

    def normalize_latents(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return z * std + mean
