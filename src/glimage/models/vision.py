"""Semantic-VQ image tokenizer of GLM-Image: a ViT encoder and a cosine nearest-code quantizer.

Legend: B images (same size in one call), N patches = gh*gw, C hidden, E code dim, K codebook size.

The reference (transformers `GlmImageVisionModel` + `GlmImageVQVAE`) packs images of different sizes in one
sequence with per-image attention; here one call takes images of one size as a batch, which gives the
same per-image attention without a block mask. There is no pixel decoder: the DiT plays that role.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig, VQConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, C), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class PositionEmbedding(nn.Module):
    """A learned (S, S) table resampled to each image's (gh, gw) grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(side * side, cfg.hidden_size)

    def forward(self, gh: int, gw: int) -> torch.Tensor:
        w = self.position_embedding.weight
        side = int(w.shape[0] ** 0.5)
        table = w.view(side, side, -1).permute(2, 0, 1)[None].float()  # (1, C, S, S)
        # The reference samples with grid_sample (bilinear, align_corners=False, border) at patch centres,
        # in fp32; its comment says bicubic but the code is bilinear.
        ys = (torch.arange(gh, device=w.device, dtype=torch.float32) + 0.5) / gh * 2 - 1
        xs = (torch.arange(gw, device=w.device, dtype=torch.float32) + 0.5) / gw * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, -1, 1, 2)  # (1, N, 1, 2)
        pos = F.grid_sample(table, grid, mode="bilinear", align_corners=False, padding_mode="border")
        return pos[0, :, :, 0].t().to(w.dtype)  # (N, C)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # bidirectional within one image
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PositionEmbedding(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1], H and W multiples of the patch -> features (B, C, gh, gw)."""
        p = self.cfg.patch_size
        B, _, H, W = pixels.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}")
        gh, gw = H // p, W // p
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))  # (B, N, C)
        x = x + self.embeddings(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return x.transpose(1, 2).reshape(B, -1, gh, gw)  # no final norm, like the reference


class VQTokenizer(nn.Module):
    """1x1 projection, then the nearest code by cosine similarity (features and codes L2-normalised)."""

    def __init__(self, cfg: VQConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.quant_conv = nn.Conv2d(in_channels, cfg.embed_dim, 1)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)
        # Unused at inference (no pixel decoder); kept so the official checkpoint loads strictly and
        # round-trips unchanged.
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, in_channels, 1)

    def encode(self, features: torch.Tensor):
        """features (B, C, gh, gw) -> (ids (B, gh, gw), z (B, gh, gw, E) normalised, codes (K, E) normalised)."""
        z = self.quant_conv(features).permute(0, 2, 3, 1)  # (B, gh, gw, E)
        z = F.normalize(z, p=2, dim=-1)
        codes = F.normalize(self.quantize.embedding.weight, p=2, dim=-1)  # (K, E)
        flat = z.reshape(-1, z.shape[-1])
        # Same expression as the reference (|z|^2 + |e|^2 - 2 z.e) so that argmin ties break identically.
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, codes.t())
        ids = dist.argmin(dim=1).view(z.shape[:-1])
        return ids, z, codes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encode(features)[0]
