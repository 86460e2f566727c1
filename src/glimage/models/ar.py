"""The AR generator of GLM-Image: a GLM-4 decoder with a visual-only head, plus the semantic-VQ tokenizer.

Legend: B batch, L sequence, S cache length, D hidden, H heads, K kv heads, hd head dim, V visual vocab.

GLM-4 specifics reproduced from the reference (transformers `modeling_glm_image.py`):
- "sandwich" norms: h = x + norm(attn(norm(x))); y = h + norm(mlp(norm(h))), RMSNorm computed in fp32 and
  cast back to the activation dtype *before* the weight multiply;
- GQA with q/k/v bias (o_proj without), fused gate_up SwiGLU (gate = first half);
- partial multimodal RoPE: only the first head_dim/2 dims rotate, non-interleaved (rotate_half), with the
  frequency bands split [8, 12, 12] between the temporal, height and width position axes;
- the head spans only the visual ids (16512), since the model never writes text.
Decoding uses a pre-allocated KV cache written in place (no per-step concatenation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ARConfig, TextConfig
from .vision import VisionEncoder, VQTokenizer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # cast before the multiply, like the reference


def mrope_cos_sin(cfg: TextConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """position_ids (3, B, L) -> cos, sin (B, L, rotary_dim), computed in fp32 then cast like the reference."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=position_ids.device) / dim))
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, L, dim/2)
    # band i of the frequencies takes its positions from axis i % 3 (t, h, w)
    chunks = freqs.split(list(cfg.mrope_section), dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (B, L, dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); rotate the first cos.shape[-1] dims with rotate_half, pass the rest through."""
    d = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, d)
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot[..., : d // 2], x_rot[..., d // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class KVCache(nn.Module):
    """Pre-allocated per-layer K/V: (layers, B, K, max_len, hd), written in place at `pos`."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, device, dtype):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, L, hd) at [pos, pos+L) and return the filled prefix (B, K, pos+L, hd). With pos a
        0-dim device tensor (the static-shape decode step: one token) return the whole cache (B, K, S, hd),
        so that every step has the same shapes; the caller's mask hides the slots not yet written."""
        if isinstance(pos, torch.Tensor):
            self.k[layer].index_copy_(2, pos.view(1), k)
            self.v[layer].index_copy_(2, pos.view(1), v)
            return self.k[layer], self.v[layer]
        end = pos + k.shape[2]
        self.k[layer, :, :, pos:end] = k
        self.v[layer, :, :, pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, pos: int = 0):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos, k, v)  # (B, K, S, hd)
        if mask is None and L > 1 and isinstance(pos, int) and pos > 0:  # new tokens after a cached prefix: causal
            mask = torch.ones(L, pos + L, dtype=torch.bool, device=x.device).tril(pos)
        # GQA without materialising the repeated K/V (16x the cache traffic for 32 heads over 2 KV heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                           enable_gqa=self.n_head != self.n_kv)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, pos=0):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, position_ids, mask=None, cache=None, pos=0):
        """input_ids (B, L), position_ids (3, B, L), mask: bool (B, 1, L, S) or None for plain causal."""
        x = self.embed_tokens(input_ids)  # (B, L, D)
        cos, sin = mrope_cos_sin(self.cfg, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, pos)
        return self.norm(x)


class GlmImageAR(nn.Module):
    """visual (ViT) + vqmodel (codebook) + language_model (GLM-4) + lm_head, named as the checkpoint."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.vqmodel = VQTokenizer(cfg.vq, cfg.vision.hidden_size)
        self.language_model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vision_vocab_size, bias=False)

    def forward(self, input_ids, position_ids, mask=None, cache=None, pos=0, last_only=False):
        """Logits over the visual vocabulary: (B, L, V), or (B, 1, V) with last_only."""
        h = self.language_model(input_ids, position_ids, mask, cache, pos)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    # read from a norm: the Linears may hold packed or int8 weights (glimage.layouts, glimage.fast)
    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    @torch.no_grad()
    def image_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """Source images (B, 3, H, W), normalised, sides multiples of the patch -> VQ ids (B, gh, gw)."""
        return self.vqmodel(self.visual(pixels))

    def tokenize_images(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Source images (each (3, H, W)) -> VQ ids (gh, gw)."""
        return [self.image_ids(p[None])[0] for p in pixels]

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        return KVCache(self.cfg.text, batch, max_len, device or self.device, dtype or self.dtype)
