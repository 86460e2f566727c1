"""GLM-Image diffusion decoder: a single-stream DiT that turns noisy VAE latents into a flow velocity.

Reference: diffusers `GlmImageTransformer2DModel` (transformer_glm_image.py, CogView4-derived). Text (glyph)
tokens and image tokens form one joint sequence [text; image] that shares every weight, but each stream has
its own adaLN modulation (the `c_*` terms are the text stream's). Semantics arrive through the prior tokens
(the AR model's visual ids, one per 2x2 latent patch) that are embedded and *added* to the image tokens;
the glyph tokens (ByT5 of quoted text) only carry what to write. 2-D RoPE rotates image tokens only.

Image-to-image: each reference image is encoded once ("write": 0 text tokens, timestep 0, its own
target size) and every layer's post-QK-norm, post-RoPE keys/values of its image tokens are kept in a
`RefKV`. The conditional denoising pass prepends them to its own keys/values ("read"); the unconditional
pass runs without them ("skip"). References never see the target (their K/V are fixed), so the whole thing
is block-causal. Mapping to the reference's `GlmImageKVCache` modes:
    write -> `model.encode_reference(...)`   read -> `model(..., kv=ref)`   skip -> `model(..., kv=None)`

Deviations from the reference that do not change the output (beyond float rounding): the joint sequence stays
one tensor (FF runs once over text+image instead of twice), RoPE tables are built in fp32 on the input's
device (the reference builds them on the CPU and copies them in every layer), the write pass stops after
the last layer's K/V projection (no FF / norm_out / proj_out for nothing), and `glyph_mask` is a real key
mask (the reference's `attention_mask` turns into a float 0/1 *additive* bias inside SDPA, i.e. no mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from glimage.config import DiTConfig

ROPE_THETA = 10000.0
LN_EPS = 1e-5  # every LayerNorm of the reference (adaLN, QK norm, norm_out); none has affine parameters


# ----------------------------------------------------------------------------------------------- helpers

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid [cos | sin] of each scalar (diffusers `get_timestep_embedding`, flip_sin_to_cos, shift 0); fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def rope_2d(h: int, w: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (h*w, head_dim) fp32 for an h x w token grid, row-major, positions starting at (0, 0).

    Half of head_dim per axis with the same head_dim/4 frequencies: [f(row) | f(col)], duplicated for the
    rotate-half layout (`GlmImageRotaryPosEmbed`)."""
    half, quarter = head_dim // 2, head_dim // 4
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, half, 2, dtype=torch.float32, device=device)[:quarter] / half))
    rows = torch.arange(h, dtype=torch.float32, device=device)[:, None] * inv_freq  # (h, q)
    cols = torch.arange(w, dtype=torch.float32, device=device)[:, None] * inv_freq  # (w, q)
    freqs = torch.cat([rows[:, None, :].expand(h, w, quarter), cols[None, :, :].expand(h, w, quarter)], dim=-1)
    freqs = freqs.reshape(h * w, half)
    freqs = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, Dh): x*cos + [-x2, x1]*sin with halves x1, x2 (not interleaved); in fp32 like the reference."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]
    return out.to(x.dtype)


def _modulate(x: torch.Tensor, n_text: int, shift_t, scale_t, shift_i, scale_i) -> torch.Tensor:
    """x (B, T+N, D): x*(1+scale)+shift with the text stream's terms on the first n_text tokens."""
    t = x[:, :n_text] * (1 + scale_t[:, None]) + shift_t[:, None]
    i = x[:, n_text:] * (1 + scale_i[:, None]) + shift_i[:, None]
    return torch.cat([t, i], dim=1)


def _gate(y: torch.Tensor, n_text: int, gate_t, gate_i) -> torch.Tensor:
    return torch.cat([y[:, :n_text] * gate_t[:, None], y[:, n_text:] * gate_i[:, None]], dim=1)


# ------------------------------------------------------------------------------------------------- refs

@dataclass
class RefKV:
    """Reference-image keys/values for image-to-image: per layer, k and v of shape (B_ref, S, H, Dh).

    B_ref is 1 (shared by the whole batch), the batch size, or a divisor of it (each sample's references
    repeated for consecutive batch rows, like `GlmImageLayerKVCache.get`)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[1]

    @staticmethod
    def concat(parts: Sequence[RefKV]) -> RefKV:
        """Several reference images of the same sample(s): keys/values joined along the sequence."""
        if not parts:
            raise ValueError("RefKV.concat needs at least one RefKV")
        return RefKV([torch.cat(ks, dim=1) for ks in zip(*(p.k for p in parts))],
                     [torch.cat(vs, dim=1) for vs in zip(*(p.v for p in parts))])

    @staticmethod
    def stack(samples: Sequence[RefKV]) -> RefKV:
        """Per-sample references (equal total length) joined along the batch."""
        lengths = sorted({s.seq_len for s in samples})
        if len(lengths) != 1:
            raise ValueError(f"RefKV.stack needs equal reference lengths per sample, got {lengths}")
        return RefKV([torch.cat(ks, dim=0) for ks in zip(*(s.k for s in samples))],
                     [torch.cat(vs, dim=0) for vs in zip(*(s.v for s in samples))])

    def select(self, rows: torch.Tensor) -> RefKV:
        """The references of batch rows `rows` (a per-sample RefKV: one entry per row)."""
        return RefKV([k.index_select(0, rows) for k in self.k], [v.index_select(0, rows) for v in self.v])

    def for_batch(self, batch_size: int) -> RefKV:
        n = self.batch_size
        if n == batch_size:
            return self
        if batch_size % n:
            raise ValueError(f"reference K/V for {n} samples cannot serve a batch of {batch_size} "
                             f"(the batch must be a multiple of {n})")
        if n == 1:
            return RefKV([k.expand(batch_size, -1, -1, -1) for k in self.k],
                         [v.expand(batch_size, -1, -1, -1) for v in self.v])
        r = batch_size // n
        return RefKV([k.repeat_interleave(r, dim=0) for k in self.k], [v.repeat_interleave(r, dim=0) for v in self.v])


# ---------------------------------------------------------------------------------------------- modules

class Proj(nn.Module):
    """A Linear kept under `.proj` (diffusers' GELU/LinearActivation and the image projector key it so)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class FeedForward(nn.Module):
    """Linear -> act -> Linear, keyed like diffusers' FeedForward (`net.0.proj`, `net.1` = dropout, `net.2`)."""

    def __init__(self, dim_in: int, inner: int, dim_out: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net = nn.ModuleList([Proj(dim_in, inner), nn.Identity(), nn.Linear(inner, dim_out)])
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.act(self.net[0].proj(x)))


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeConditionEmbed(nn.Module):
    """temb = SiLU(MLP(sin(t)) + MLP([sin(crop_y), sin(crop_x), sin(H), sin(W)])), SDXL-style size conditioning."""

    def __init__(self, time_dim: int, condition_dim: int):
        super().__init__()
        self.time_dim, self.condition_dim = time_dim, condition_dim
        self.timestep_embedder = MLPEmbedder(time_dim, time_dim)
        self.condition_embedder = MLPEmbedder(4 * condition_dim, time_dim)

    def forward(self, timestep, target_size, crop_coords, dtype: torch.dtype) -> torch.Tensor:
        b = timestep.shape[0]
        t = timestep_embedding(timestep, self.time_dim)  # (B, time_dim) fp32
        crop = timestep_embedding(crop_coords.flatten(), self.condition_dim).view(b, -1)
        size = timestep_embedding(target_size.flatten(), self.condition_dim).view(b, -1)
        cond = torch.cat([crop, size], dim=1)  # (B, 4*condition_dim)
        return F.silu(self.timestep_embedder(t.to(dtype)) + self.condition_embedder(cond.to(dtype)))


class AdaLNZero(nn.Module):
    """The 12 per-block modulation vectors from temb (no SiLU here: temb already went through one)."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 12 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(temb).chunk(12, dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def qkv(self, h: torch.Tensor, n_text: int, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T+N, D) -> q, k, v (B, T+N, H, Dh); q/k per-head LayerNorm, then RoPE on image tokens only."""
        dtype = h.dtype
        q = self.to_q(h).unflatten(2, (self.heads, self.head_dim))
        k = self.to_k(h).unflatten(2, (self.heads, self.head_dim))
        v = self.to_v(h).unflatten(2, (self.heads, self.head_dim))
        q = F.layer_norm(q, (self.head_dim,), eps=LN_EPS).to(dtype)
        k = F.layer_norm(k, (self.head_dim,), eps=LN_EPS).to(dtype)
        q = torch.cat([q[:, :n_text], apply_rope(q[:, n_text:], *rope)], dim=1)
        k = torch.cat([k[:, :n_text], apply_rope(k[:, n_text:], *rope)], dim=1)
        return q, k, v

    def attend(self, q, k, v, ref: tuple[torch.Tensor, torch.Tensor] | None = None,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full (non-causal) attention; `ref` K/V (B, S, H, Dh) are prepended to the keys/values."""
        if ref is not None:
            k = torch.cat([ref[0], k], dim=1)
            v = torch.cat([ref[1], v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask)  # (B, H, L, Dh), scale 1/sqrt(Dh)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return self.to_out[0](out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, time_dim: int):
        super().__init__()
        self.dim = dim
        self.norm1 = AdaLNZero(time_dim, dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim, 4 * dim, dim, partial(F.gelu, approximate="tanh"))

    def forward(self, x: torch.Tensor, n_text: int, temb: torch.Tensor, rope, ref=None, key_mask=None,
                kv_only: bool = False, return_kv: bool = False):
        """x (B, T+N, D), text first -> (x, k, v): the updated stream and, with return_kv, this layer's
        post-norm, post-RoPE keys/values (B, T+N, H, Dh), which the reference-image write pass keeps (else
        None: returning unused views trips FSDP2's backward hooks). kv_only stops there (x None)."""
        (shift_msa, c_shift_msa, scale_msa, c_scale_msa, gate_msa, c_gate_msa,
         shift_mlp, c_shift_mlp, scale_mlp, c_scale_mlp, gate_mlp, c_gate_mlp) = self.norm1(temb)
        h = F.layer_norm(x, (self.dim,), eps=LN_EPS).to(x.dtype)
        h = _modulate(h, n_text, c_shift_msa, c_scale_msa, shift_msa, scale_msa)
        q, k, v = self.attn1.qkv(h, n_text, rope)
        if kv_only:
            return None, k, v
        x = x + _gate(self.attn1.attend(q, k, v, ref, key_mask), n_text, c_gate_msa, gate_msa)
        h = _modulate(F.layer_norm(x, (self.dim,), eps=LN_EPS), n_text, c_shift_mlp, c_scale_mlp, shift_mlp, scale_mlp)
        x = x + _gate(self.ff(h), n_text, c_gate_mlp, gate_mlp)  # one FF over both streams (same weights)
        return (x, k, v) if return_kv else (x, None, None)


class NormOut(nn.Module):
    """Final adaptive LayerNorm: Linear(temb) -> (scale, shift) in that order, no extra SiLU."""

    def __init__(self, time_dim: int, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(time_dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb.to(x.dtype)).chunk(2, dim=1)
        return F.layer_norm(x, (self.dim,), eps=LN_EPS) * (1 + scale)[:, None] + shift[:, None]


# -------------------------------------------------------------------------------------------------- DiT

class GlmImageDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.attention_head_dim % 4:
            raise ValueError(f"attention_head_dim {cfg.attention_head_dim} must be a multiple of 4 (2-D RoPE "
                             "gives each axis a quarter of the head's rotation pairs)")
        self.cfg = cfg
        d, p = cfg.inner_dim, cfg.patch_size
        self.image_projector = Proj(cfg.in_channels * p * p, d)
        self.glyph_projector = FeedForward(cfg.text_embed_dim, d, d, F.gelu)  # exact (erf) GELU
        self.prior_token_embedding = nn.Embedding(cfg.prior_vq_quantizer_codebook_size, d)
        self.prior_projector = FeedForward(d, d, d, F.silu)
        self.time_condition_embed = TimeConditionEmbed(cfg.time_embed_dim, cfg.condition_dim)
        self.transformer_blocks = nn.ModuleList(
            [Block(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.time_embed_dim)
             for _ in range(cfg.num_layers)])
        self.norm_out = NormOut(cfg.time_embed_dim, d)
        self.proj_out = nn.Linear(d, p * p * cfg.out_channels)

    # -- pieces shared by the denoising pass and the reference-image write pass

    def _check_latents(self, latents: torch.Tensor) -> tuple[int, int, int]:
        p, c = self.cfg.patch_size, self.cfg.in_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be (B, {c}, h, w), got {tuple(latents.shape)}")
        if latents.shape[2] % p or latents.shape[3] % p or latents.shape[2] == 0 or latents.shape[3] == 0:
            raise ValueError(f"latent height/width must be positive multiples of the patch size {p}, "
                             f"got {tuple(latents.shape[2:])}")
        return latents.shape[0], latents.shape[2] // p, latents.shape[3] // p

    def _embed_image(self, latents, prior_token_id, prior_token_drop) -> torch.Tensor:
        """Patchified latents + projected prior-token embeddings -> image tokens (B, N, D)."""
        b, gh, gw = self._check_latents(latents)
        p, n = self.cfg.patch_size, gh * gw
        if tuple(prior_token_id.shape) != (b, n):
            raise ValueError(f"prior_token_id must be (B, N) = ({b}, {n}) for latents {tuple(latents.shape)}, "
                             f"got {tuple(prior_token_id.shape)}")
        dtype = self.image_projector.proj.weight.dtype
        x = latents.to(dtype).reshape(b, -1, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).flatten(3, 5).flatten(1, 2)
        x = self.image_projector.proj(x)  # (B, N, D); features in (C, p, p) order
        prior = self.prior_token_embedding(prior_token_id)  # (B, N, D)
        if prior_token_drop is not None:
            if prior_token_drop.shape != prior_token_id.shape:
                raise ValueError(f"prior_token_drop must be {tuple(prior_token_id.shape)} like prior_token_id, "
                                 f"got {tuple(prior_token_drop.shape)}")
            # Zeroed BEFORE the projector, so a dropped prior still contributes the projector's biases.
            prior = prior.masked_fill(prior_token_drop[..., None], 0.0)
        return x + self.prior_projector(prior)

    def _temb(self, timestep, target_size, crop_coords, b: int, dtype) -> torch.Tensor:
        device = self.proj_out.weight.device  # plain copies if the caller built these on the CPU
        timestep = torch.as_tensor(timestep, device=device).reshape(-1)
        target_size, crop_coords = target_size.to(device), crop_coords.to(device)
        if timestep.numel() == 1:
            timestep = timestep.expand(b)
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be (B,) = ({b},) or a scalar, got {tuple(timestep.shape)}")
        for name, value in (("target_size", target_size), ("crop_coords", crop_coords)):
            if tuple(value.shape) != (b, 2):
                raise ValueError(f"{name} must be (B, 2) = ({b}, 2), got {tuple(value.shape)}")
        return self.time_condition_embed(timestep, target_size, crop_coords, dtype)

    # -- forward passes

    def forward(self, latents: torch.Tensor, glyph: torch.Tensor, prior_token_id: torch.Tensor,
                prior_token_drop: torch.Tensor | None, timestep: torch.Tensor, target_size: torch.Tensor,
                crop_coords: torch.Tensor, kv: RefKV | None = None,
                glyph_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C_out, h, w) for noisy latents (B, C, h, w).

        glyph (B, T, text_embed_dim) ByT5 embeddings (T may be 0); prior_token_id (B, h/p*w/p) visual ids;
        prior_token_drop (B, N) bool, True = drop (the unconditional branch drops all), None = keep all;
        timestep (B,) on the 0..999 scale (the pipeline feeds t-1 of its unshifted grid); target_size and
        crop_coords (B, 2) in pixels; kv: reference-image K/V to read (None = no references / "skip");
        glyph_mask (B, T) bool, True = real token: masks padded glyph keys so that branches with different
        glyph lengths can share a batch (not in the reference, which runs them as separate batch-1 calls)."""
        b, gh, gw = self._check_latents(latents)
        if glyph.ndim != 3 or glyph.shape[0] != b or glyph.shape[2] != self.cfg.text_embed_dim:
            raise ValueError(f"glyph must be (B, T, {self.cfg.text_embed_dim}) with B = {b}, "
                             f"got {tuple(glyph.shape)}")
        n_text = glyph.shape[1]
        x = self._embed_image(latents, prior_token_id, prior_token_drop)  # (B, N, D)
        e = self.glyph_projector(glyph.to(x.dtype))  # (B, T, D)
        temb = self._temb(timestep, target_size, crop_coords, b, x.dtype)  # (B, time_dim)
        rope = rope_2d(gh, gw, self.cfg.attention_head_dim, x.device)

        refs = [None] * len(self.transformer_blocks)
        n_ref = 0
        if kv is not None:
            if len(kv.k) != len(self.transformer_blocks):
                raise ValueError(f"kv has {len(kv.k)} layers, the model {len(self.transformer_blocks)}")
            kv = kv.for_batch(b)
            refs, n_ref = list(zip(kv.k, kv.v)), kv.seq_len
        key_mask = None
        if glyph_mask is not None:
            if tuple(glyph_mask.shape) != (b, n_text):
                raise ValueError(f"glyph_mask must be (B, T) = ({b}, {n_text}), got {tuple(glyph_mask.shape)}")
            keep = glyph_mask.to(device=x.device, dtype=torch.bool)
            key_mask = torch.cat([keep.new_ones(b, n_ref), keep, keep.new_ones(b, gh * gw)], dim=1)
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, S+T+N)

        s = self.run_blocks(torch.cat([e, x], dim=1), n_text, temb, rope, refs, key_mask)  # (B, T+N, D)
        x = self.proj_out(self.norm_out(s[:, n_text:], temb))  # (B, N, p*p*C_out)

        p = self.cfg.patch_size
        x = x.reshape(b, gh, gw, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
        return x.flatten(4, 5).flatten(2, 3)

    def run_blocks(self, s: torch.Tensor, n_text: int, temb, rope, refs, key_mask) -> torch.Tensor:
        """The stream (B, T+N, D) through every block (a step cache replaces this from outside: glimage.fast)."""
        for block, ref in zip(self.transformer_blocks, refs):
            s, _, _ = block(s, n_text, temb, rope, ref, key_mask)
        return s

    def encode_reference(self, latents: torch.Tensor, prior_token_id: torch.Tensor, target_size: torch.Tensor,
                         crop_coords: torch.Tensor | None = None) -> RefKV:
        """The "write" pass: K/V of every layer for clean reference latents (B, C, h, w) ((z - mean) / std of
        the VAE mode), their own prior ids (B, N) and pixel size (B, 2); 0 text tokens, timestep 0, RoPE from
        (0, 0). One call per reference image size; join several images with `RefKV.concat`."""
        b, gh, gw = self._check_latents(latents)
        x = self._embed_image(latents, prior_token_id, None)
        if crop_coords is None:
            crop_coords = torch.zeros(b, 2, device=x.device)
        temb = self._temb(torch.zeros(b, device=x.device), target_size, crop_coords, b, x.dtype)
        rope = rope_2d(gh, gw, self.cfg.attention_head_dim, x.device)
        ks, vs = [], []
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            x, k, v = block(x, 0, temb, rope, kv_only=i == last, return_kv=True)  # the last layer's output is never used
            ks.append(k)
            vs.append(v)
        return RefKV(ks, vs)
