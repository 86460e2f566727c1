"""The glyph encoder: a ByT5 (T5 v1.1) encoder stack, as transformers' `T5EncoderModel` computes it.

ids (B, L) of UTF-8 bytes (+3) -> (B, L, d_model) hidden states, which the DiT reads as its text tokens.

Module names mirror `T5EncoderModel` (`shared`, `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`,
`encoder.block.0.layer.0.SelfAttention.relative_attention_bias`, `layer.{0,1}.layer_norm`,
`layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `encoder.final_layer_norm`). The reference also has
`encoder.embed_tokens`, tied to `shared`; here there is only `shared` (see convert/glyph.py).

T5 quirks kept on purpose: no 1/sqrt(d) attention scaling (folded into the init), one relative-position bias
table (layer 0) shared by every layer, RMS norm without mean/bias whose statistic is computed in fp32, the
tanh-approximate "gelu_new" gate, and `wo` fed in its own weight dtype. No dropout: the glyph encoder is used
frozen (the reference runs it in eval mode).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glimage.config import GlyphConfig


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference numerics: variance in fp32, x * rsqrt promotes to fp32, cast back only for half weights.
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation written out (F.gelu(approximate="tanh") rounds differently in half precision)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5Attention(nn.Module):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # bias: (B or 1, H, L, L) = relative-position bias with padded keys set to finfo.min (the reference's
        # SDPA path builds exactly this additive mask). T5 does not scale the scores.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (B, H, L, d_kv)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_new(self.wi_0(x)) * self.wi_1(x)
        # transformers keeps `wo` in fp32 for fp16 checkpoints and casts its input to match; the fp32 output then
        # promotes the residual stream to fp32 (reproduced: load_glyph_encoder keeps wo fp32 under fp16).
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # T5Block clamps fp16 activations (to finfo.max, or max - 1000 once an inf appeared) to avoid inf/nan
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, cfg: GlyphConfig, has_relative_attention_bias: bool):
        super().__init__()
        # `layer.0` / `layer.1` are the checkpoint names of the attention and feed-forward sub-layers
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucketing: half the buckets per direction, exact below num_buckets/4, log-spaced above."""
    num_buckets //= 2
    buckets = (relative_position > 0).to(torch.long) * num_buckets
    n = torch.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) = -inf on the small positions is discarded by the where below, as in the reference
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class T5Stack(nn.Module):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        self.cfg = cfg
        self.block = nn.ModuleList([T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def position_bias(self, L: int, mask: torch.Tensor | None) -> torch.Tensor:
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias  # (buckets, H)
        pos = torch.arange(L, device=table.weight.device)
        bucket = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)  # (L, L), key - query
        bias = table(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, H, L, L), in the weights' dtype = q/k dtype
        if mask is not None:
            # padded keys -> finfo.min (not -inf: a fully padded row stays finite), like the reference's SDPA path
            bias = torch.where(mask.bool()[:, None, None, :], bias, torch.finfo(bias.dtype).min)  # (B, H, L, L)
        return bias


class GlyphEncoder(nn.Module):
    def __init__(self, cfg: GlyphConfig):
        super().__init__()
        if cfg.feed_forward_proj != "gated-gelu":
            raise ValueError(f"feed_forward_proj must be 'gated-gelu' (ByT5 v1.1), got {cfg.feed_forward_proj!r}")
        if cfg.max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for the eos token), got {cfg.max_length}")
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) int, mask (B, L) 1 = token / 0 = padding (None: all valid) -> (B, L, d_model).

        Every row is computed (padded queries too, as in the reference); the caller keeps the mask==1 rows.
        """
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
        x = self.shared(ids)  # (B, L, D)
        bias = self.encoder.position_bias(ids.shape[1], mask)  # computed once, shared by every layer
        for block in self.encoder.block:
            x = block(x, bias)  # (an fp32 `wo` under fp16 promotes this residual stream to fp32, as in the reference)
        return self.encoder.final_layer_norm(x)
