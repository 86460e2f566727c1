"""The GLM-Image diffusion decoder in MindSpore: glimage.models.dit op for op (single-stream DiT over
[glyph tokens; image tokens] with per-stream adaLN, prior-token embedding, 2-D RoPE on image tokens,
reference-image K/V prepended to the keys for image-to-image). Shapes and semantics: see the torch module.
"""

from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import DiTConfig
from .layers import Embedding, Linear, attention, layer_norm

ROPE_THETA = 10000.0
LN_EPS = 1e-5


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoid [cos | sin] of each scalar (flip_sin_to_cos, shift 0), fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32)
    freqs = Tensor(np.exp(exponent / half).astype(np.float32))
    args = t.astype(ms.float32)[:, None] * freqs[None, :]
    emb = ops.cat([ops.cos(args), ops.sin(args)], -1)
    return ops.pad(emb, (0, 1)) if dim % 2 else emb


def rope_2d(h: int, w: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos, sin (h*w, head_dim) fp32: [f(row) | f(col)] duplicated for rotate-half (built on the host)."""
    half, quarter = head_dim // 2, head_dim // 4
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, half, 2, dtype=np.float32)[:quarter] / half))
    rows = np.arange(h, dtype=np.float32)[:, None] * inv_freq
    cols = np.arange(w, dtype=np.float32)[:, None] * inv_freq
    freqs = np.concatenate([np.broadcast_to(rows[:, None], (h, w, quarter)),
                            np.broadcast_to(cols[None], (h, w, quarter))], -1).reshape(h * w, half)
    freqs = Tensor(np.concatenate([freqs, freqs], -1).astype(np.float32))
    return ops.cos(freqs), ops.sin(freqs)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, N, H, Dh): x*cos + [-x2, x1]*sin, in fp32."""
    x1, x2 = ops.chunk(x, 2, -1)
    rotated = ops.cat([-x2, x1], -1)
    out = x.astype(ms.float32) * cos[:, None, :] + rotated.astype(ms.float32) * sin[:, None, :]
    return out.astype(x.dtype)


# n_text = 0 (the reference-image write pass) skips the text slice: the gradient of an empty slice fails on
# MindSpore's CPU backend (StridedSliceGrad: "input memory out of bounds")

def gelu_tanh(x: Tensor) -> Tensor:  # named functions, not lambdas: MindSpore's graph compiler parses them
    return ops.gelu(x, approximate="tanh")


def gelu_exact(x: Tensor) -> Tensor:
    return ops.gelu(x, approximate="none")


def _modulate(x, n_text, shift_t, scale_t, shift_i, scale_i):
    i = x[:, n_text:] * (1 + scale_i[:, None]) + shift_i[:, None]
    if not n_text:
        return i
    return ops.cat([x[:, :n_text] * (1 + scale_t[:, None]) + shift_t[:, None], i], 1)


def _gate(y, n_text, gate_t, gate_i):
    if not n_text:
        return y * gate_i[:, None]
    return ops.cat([y[:, :n_text] * gate_t[:, None], y[:, n_text:] * gate_i[:, None]], 1)


def _rope_image(x, n_text, rope):
    return ops.cat([x[:, :n_text], apply_rope(x[:, n_text:], *rope)], 1) if n_text else apply_rope(x, *rope)


class Proj(nn.Cell):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)


class FeedForward(nn.Cell):
    """Keyed like diffusers' FeedForward: `net.0.proj`, (net.1 = dropout, no weights), `net.2`."""

    def __init__(self, dim_in: int, inner: int, dim_out: int, act):
        super().__init__()
        self.net = nn.CellList([Proj(dim_in, inner), nn.Identity(), Linear(inner, dim_out)])
        self.act = act

    def construct(self, x):
        return self.net[2](self.act(self.net[0].proj(x)))


class MLPEmbedder(nn.Cell):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(dim_in, dim)
        self.linear_2 = Linear(dim, dim)

    def construct(self, x):
        return self.linear_2(ops.silu(self.linear_1(x)))


class TimeConditionEmbed(nn.Cell):
    def __init__(self, time_dim: int, condition_dim: int):
        super().__init__()
        self.time_dim, self.condition_dim = time_dim, condition_dim
        self.timestep_embedder = MLPEmbedder(time_dim, time_dim)
        self.condition_embedder = MLPEmbedder(4 * condition_dim, time_dim)

    def construct(self, timestep, target_size, crop_coords, dtype):
        b = timestep.shape[0]
        t = timestep_embedding(timestep, self.time_dim)
        crop = timestep_embedding(crop_coords.reshape(-1), self.condition_dim).reshape(b, -1)
        size = timestep_embedding(target_size.reshape(-1), self.condition_dim).reshape(b, -1)
        cond = ops.cat([crop, size], 1)
        return ops.silu(self.timestep_embedder(t.astype(dtype)) + self.condition_embedder(cond.astype(dtype)))


class AdaLNZero(nn.Cell):
    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = Linear(time_dim, 12 * dim)

    def construct(self, temb):
        return ops.chunk(self.linear(temb), 12, 1)


class Attention(nn.Cell):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = Linear(dim, heads * head_dim)
        self.to_k = Linear(dim, heads * head_dim)
        self.to_v = Linear(dim, heads * head_dim)
        self.to_out = nn.CellList([Linear(heads * head_dim, dim)])

    def qkv(self, h, n_text, rope):
        """h (B, T+N, D) -> q, k, v (B, T+N, H, Dh): per-head LayerNorm on q/k, RoPE on image tokens."""
        B, L, _ = h.shape
        shape = (B, L, self.heads, self.head_dim)
        q, k, v = (p(h).reshape(shape) for p in (self.to_q, self.to_k, self.to_v))
        q, k = layer_norm(q, LN_EPS), layer_norm(k, LN_EPS)
        return _rope_image(q, n_text, rope), _rope_image(k, n_text, rope), v

    def attend(self, q, k, v, ref=None, key_mask=None):
        if ref is not None:
            k, v = ops.cat([ref[0], k], 1), ops.cat([ref[1], v], 1)
        out = attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask)  # (B, H, L, Dh)
        out = out.swapaxes(1, 2)
        return self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1))


class Block(nn.Cell):
    def __init__(self, dim: int, heads: int, head_dim: int, time_dim: int):
        super().__init__()
        self.dim = dim
        self.norm1 = AdaLNZero(time_dim, dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim, 4 * dim, dim, gelu_tanh)

    def construct(self, x, n_text, temb, rope, ref=None, key_mask=None, kv_only=False):
        (shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
         shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp) = self.norm1(temb)
        h = _modulate(layer_norm(x, LN_EPS), n_text, c_shift_msa, c_scale_msa, shift_msa, scale_msa)
        q, k, v = self.attn1.qkv(h, n_text, rope)
        if kv_only:
            return None, k, v
        x = x + _gate(self.attn1.attend(q, k, v, ref, key_mask), n_text, c_gate_msa, gate_msa)
        h = _modulate(layer_norm(x, LN_EPS), n_text, c_shift_mlp, c_scale_mlp, shift_mlp, scale_mlp)
        return x + _gate(self.ff(h), n_text, c_gate_mlp, gate_mlp), k, v


class NormOut(nn.Cell):
    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = Linear(time_dim, 2 * dim)

    def construct(self, x, temb):
        scale, shift = ops.chunk(self.linear(temb.astype(x.dtype)), 2, 1)
        return layer_norm(x, LN_EPS) * (1 + scale)[:, None] + shift[:, None]


class GlmImageDiT(nn.Cell):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.inner_dim, cfg.patch_size
        self.image_projector = Proj(cfg.in_channels * p * p, d)
        self.glyph_projector = FeedForward(cfg.text_embed_dim, d, d, gelu_exact)
        self.prior_token_embedding = Embedding(cfg.prior_vq_quantizer_codebook_size, d)
        self.prior_projector = FeedForward(d, d, d, ops.silu)
        self.time_condition_embed = TimeConditionEmbed(cfg.time_embed_dim, cfg.condition_dim)
        self.transformer_blocks = nn.CellList(
            [Block(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.time_embed_dim)
             for _ in range(cfg.num_layers)])
        self.norm_out = NormOut(cfg.time_embed_dim, d)
        self.proj_out = Linear(d, p * p * cfg.out_channels)

    def _embed_image(self, latents, prior_token_id, prior_token_drop):
        b, c, h, w = latents.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        x = latents.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        x = self.image_projector.proj(x.astype(self.image_projector.proj.weight.dtype))  # (B, N, D)
        prior = self.prior_token_embedding(prior_token_id)
        if prior_token_drop is not None:  # zeroed before the projector: a dropped prior keeps its biases
            prior = ops.masked_fill(prior, prior_token_drop[..., None], 0.0)
        return x + self.prior_projector(prior)

    def _temb(self, timestep, target_size, crop_coords, b, dtype):
        if timestep.ndim == 0 or timestep.shape[0] == 1:
            timestep = ops.broadcast_to(timestep.reshape(1), (b,))
        return self.time_condition_embed(timestep, target_size, crop_coords, dtype)

    def construct(self, latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords,
                  refs=None, glyph_mask=None):
        """Velocity (B, C_out, h, w) for noisy latents (B, C, h, w); refs: per layer (k, v) (B, S, H, Dh) of
        the reference images, already one row per batch row (None = no references)."""
        b, _, h, w = latents.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        n_text = glyph.shape[1]
        x = self._embed_image(latents, prior_token_id, prior_token_drop)
        e = self.glyph_projector(glyph.astype(x.dtype))
        temb = self._temb(timestep, target_size, crop_coords, b, x.dtype)
        rope = rope_2d(gh, gw, self.cfg.attention_head_dim)
        refs = refs if refs is not None else [None] * len(self.transformer_blocks)
        key_mask = None
        if glyph_mask is not None:
            n_ref = refs[0][0].shape[1] if refs[0] is not None else 0
            keep = glyph_mask.astype(ms.bool_)
            key_mask = ops.cat([ops.ones((b, n_ref), ms.bool_), keep, ops.ones((b, gh * gw), ms.bool_)], 1)
            key_mask = key_mask[:, None, None, :]
        s = ops.cat([e, x], 1)
        for block, ref in zip(self.transformer_blocks, refs):
            s, _, _ = block(s, n_text, temb, rope, ref, key_mask)
        x = self.proj_out(self.norm_out(s[:, n_text:], temb))  # (B, N, p*p*C_out)
        x = x.reshape(b, gh, gw, -1, p, p).transpose(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
        return x.reshape(b, -1, h, w)

    def encode_reference(self, latents, prior_token_id, target_size, crop_coords):
        """The write pass: per layer (k, v) (B, N, H, Dh) of clean reference latents at timestep 0."""
        b, _, h, w = latents.shape
        p = self.cfg.patch_size
        x = self._embed_image(latents, prior_token_id, None)
        temb = self._temb(ops.zeros((b,), ms.float32), target_size, crop_coords, b, x.dtype)
        rope = rope_2d(h // p, w // p, self.cfg.attention_head_dim)
        out = []
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            x, k, v = block(x, 0, temb, rope, kv_only=i == last)
            out.append((k, v))
        return out
