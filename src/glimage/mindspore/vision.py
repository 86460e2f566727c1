"""The semantic-VQ image tokenizer in MindSpore: glimage.models.vision op for op (ViT encoder, cosine
nearest-code quantizer). Legend: B images, N patches = gh*gw, C hidden, E code dim, K codebook size.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import VisionConfig, VQConfig
from .layers import Conv2d, Embedding, LayerNorm, Linear, attention


class PatchEmbed(nn.Cell):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def construct(self, x):  # (B, 3, H, W) -> (B, N, C), row-major patches
        y = self.proj(x)
        return y.reshape(y.shape[0], y.shape[1], -1).swapaxes(1, 2)


class PositionEmbedding(nn.Cell):
    """A learned (S, S) table resampled bilinearly (grid_sample, border, align_corners=False) to (gh, gw)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        side = cfg.image_size // cfg.patch_size
        self.position_embedding = Embedding(side * side, cfg.hidden_size)

    def construct(self, gh: int, gw: int) -> Tensor:
        w = self.position_embedding.weight
        side = int(round(w.shape[0] ** 0.5))
        table = w.reshape(side, side, -1).transpose(2, 0, 1)[None].astype(ms.float32)  # (1, C, S, S)
        ys = (np.arange(gh, dtype=np.float32) + 0.5) / gh * 2 - 1
        xs = (np.arange(gw, dtype=np.float32) + 0.5) / gw * 2 - 1
        grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(1, -1, 1, 2)  # (1, N, 1, 2)
        pos = ops.grid_sample(table, Tensor(grid), "bilinear", "border", False)  # (1, C, N, 1)
        return pos[0, :, :, 0].swapaxes(0, 1).astype(w.dtype)  # (N, C)


class VisionAttention(nn.Cell):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.attention_bias)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, cfg.attention_bias)

    def construct(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.n_head, C // self.n_head).transpose(2, 0, 3, 1, 4)
        y = attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd), bidirectional
        return self.proj(y.swapaxes(1, 2).reshape(B, N, C))


class VisionMLP(nn.Cell):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def construct(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate="none"))


class VisionBlock(nn.Cell):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Cell):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PositionEmbedding(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.CellList([VisionBlock(cfg) for _ in range(cfg.depth)])

    def construct(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, H, W) in [-1, 1], sides multiples of the patch -> features (B, C, gh, gw)."""
        p = self.cfg.patch_size
        B, _, H, W = pixels.shape
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}")
        gh, gw = H // p, W // p
        x = self.patch_embed(pixels.astype(self.patch_embed.proj.weight.dtype)) + self.embeddings(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return x.swapaxes(1, 2).reshape(B, -1, gh, gw)


def _normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """torch.nn.functional.normalize(p=2) over the last axis."""
    n = ops.sqrt((x * x).sum(-1, keepdims=True))
    return x / ops.maximum(n, Tensor(eps, x.dtype))


class VQTokenizer(nn.Cell):
    """1x1 projection, then the nearest code by cosine similarity (features and codes L2-normalised)."""

    def __init__(self, cfg: VQConfig, in_channels: int):
        super().__init__()
        self.cfg = cfg
        self.quant_conv = Conv2d(in_channels, cfg.embed_dim, 1)
        self.quantize = nn.Cell()
        self.quantize.embedding = Embedding(cfg.num_embeddings, cfg.embed_dim)
        self.post_quant_conv = Conv2d(cfg.embed_dim, in_channels, 1)  # unused; kept for strict loading

    def construct(self, features: Tensor) -> Tensor:
        """features (B, C, gh, gw) -> ids (B, gh, gw)."""
        z = _normalize(self.quant_conv(features).transpose(0, 2, 3, 1))  # (B, gh, gw, E)
        codes = _normalize(self.quantize.embedding.weight)  # (K, E)
        flat = z.reshape(-1, z.shape[-1])
        # the reference's expression (|z|^2 + |e|^2 - 2 z.e), so that ties break alike
        dist = (flat * flat).sum(1, keepdims=True) + (codes * codes).sum(1) - 2 * ops.matmul(flat, codes.swapaxes(0, 1))
        return ops.argmin(dist, axis=1).reshape(z.shape[:-1])
