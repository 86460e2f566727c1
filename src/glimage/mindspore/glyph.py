"""The ByT5 glyph encoder in MindSpore: glimage.models.glyph op for op (T5 v1.1 encoder: unscaled attention
with one shared relative-position bias, fp32-statistic RMS norm, gated gelu_new). fp32 only (the fp16 clamps
and the fp32 `wo` of the torch module are not ported: MindSpore on CPU runs fp32, and fp16 T5 is a legacy mode).
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import GlyphConfig
from .layers import Embedding, Linear, attention, ones


class T5LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = ones(dim)
        self.eps = eps

    def construct(self, x: Tensor) -> Tensor:
        variance = (x.astype(ms.float32) ** 2).mean(-1, keep_dims=True)
        return self.weight * (x * ops.rsqrt(variance + self.eps))


def gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * ops.pow(x, 3.0))))


class T5Attention(nn.Cell):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def construct(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, self.d_kv).swapaxes(1, 2) for p in (self.q, self.k, self.v))
        y = attention(q, k, v, bias, scale=1.0)  # T5 does not scale the scores
        return self.o(y.swapaxes(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def construct(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Cell):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def construct(self, x: Tensor) -> Tensor:
        return self.wo(gelu_new(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Cell):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def construct(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Cell):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def construct(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucketing of (key - query) offsets: index arithmetic, done on the host."""
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    n = np.abs(relative_position)
    max_exact = num_buckets // 2
    # the small offsets (log(0) among them) are discarded by the where below
    large = max_exact + (np.log(np.maximum(n, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class T5Stack(nn.Cell):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.cfg = cfg
        self.block = nn.CellList([T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, L: int, mask: Tensor | None) -> Tensor:
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias  # (buckets, H)
        pos = np.arange(L)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)
        bias = table(Tensor(bucket)).transpose(2, 0, 1)[None]  # (1, H, L, L)
        if mask is not None:  # padded keys -> finfo.min (a fully padded row stays finite), like the reference
            low = Tensor(float(np.finfo(np.float32).min), bias.dtype)
            bias = ops.where(mask.astype(ms.bool_)[:, None, None, :], bias, low)  # (B, H, L, L)
        return bias


class GlyphEncoder(nn.Cell):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def construct(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids (B, L) int, mask (B, L) 1 = token / 0 = padding -> (B, L, d_model)."""
        x = self.shared(ids)
        bias = self.encoder.position_bias(ids.shape[1], mask)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
