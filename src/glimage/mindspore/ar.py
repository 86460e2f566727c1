"""The AR generator in MindSpore: glimage.models.ar op for op (GLM-4 decoder with sandwich norms, GQA,
partial MRoPE, a static pre-allocated KV cache, the visual head) plus the ViT + VQ tokenizer (vision.py).

Legend: B batch, L sequence, S cache length, D hidden, H heads, K kv heads, hd head dim, V visual vocab.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import ARConfig, TextConfig
from .layers import Embedding, Linear, attention, ones
from .vision import VisionEncoder, VQTokenizer


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = ones(dim)

    def construct(self, x: Tensor) -> Tensor:
        xf = x.astype(ms.float32)
        xf = xf * ops.rsqrt((xf * xf).mean(-1, keep_dims=True) + self.eps)
        return self.weight * xf.astype(x.dtype)  # cast before the multiply, like the reference


def mrope_cos_sin(cfg: TextConfig, position_ids: Tensor, dtype):
    """position_ids (3, B, L) -> cos, sin (B, L, rotary_dim); band i of the frequencies reads axis i % 3."""
    dim = cfg.rotary_dim
    inv_freq = Tensor(1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)))
    freqs = position_ids.astype(ms.float32)[..., None] * inv_freq  # (3, B, L, dim/2)
    chunks, start = [], 0
    for i, n in enumerate(cfg.mrope_section):
        chunks.append(freqs[i % 3, :, :, start:start + n])
        start += n
    freqs = ops.cat(chunks, -1)  # (B, L, dim/2)
    emb = ops.cat([freqs, freqs], -1)
    return ops.cos(emb).astype(dtype), ops.sin(emb).astype(dtype)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, hd): rotate the first cos.shape[-1] dims (rotate_half), pass the rest through."""
    d = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :d], x[..., d:]
    rotated = ops.cat([-x_rot[..., d // 2:], x_rot[..., : d // 2]], -1)
    return ops.cat([x_rot * cos + rotated * sin, x_pass], -1)


class KVCache:
    """Pre-allocated per-layer K/V (B, K, max_len, hd), written in place at [pos, pos + L)."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [ops.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [ops.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]

    def update(self, layer: int, pos: int, k: Tensor, v: Tensor):
        end = pos + k.shape[2]
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Cell):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.head_dim, cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, cfg.attention_bias)
        self.o_proj = Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def construct(self, x, cos, sin, mask, cache: KVCache | None = None, pos: int = 0):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_head, self.head_dim).swapaxes(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim).swapaxes(1, 2)  # (B, K, L, hd)
        v = self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim).swapaxes(1, 2)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos, k, v)  # (B, K, S, hd)
        # no mask: plain causal over the keys (new tokens after a cached prefix see all of it)
        y = attention(q, k, v, mask, causal=mask is None and L > 1)
        return self.o_proj(y.swapaxes(1, 2).reshape(B, L, -1))

    def static(self, x, cos, sin, mask, k_cache, v_cache, slot):
        """One token with static shapes (graph mode): its K/V replace the cache's slot (slot: (S,) one-hot
        bool) in new cache tensors; attention over the whole cache under mask (B, 1, 1, S)."""
        B = x.shape[0]
        q = self.q_proj(x).reshape(B, 1, self.n_head, self.head_dim).swapaxes(1, 2)
        k = self.k_proj(x).reshape(B, 1, self.n_kv, self.head_dim).swapaxes(1, 2)
        v = self.v_proj(x).reshape(B, 1, self.n_kv, self.head_dim).swapaxes(1, 2)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        where = slot.reshape(1, 1, -1, 1)
        k_cache, v_cache = ops.where(where, k, k_cache), ops.where(where, v, v_cache)
        y = attention(q, k_cache, v_cache, mask)
        return self.o_proj(y.swapaxes(1, 2).reshape(B, 1, -1)), k_cache, v_cache


class MLP(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def construct(self, x):
        gate, up = ops.chunk(self.gate_up_proj(x), 2, -1)
        return self.down_proj(up * ops.silu(gate))


class DecoderLayer(nn.Cell):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def construct(self, x, cos, sin, mask, cache=None, pos=0):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))

    def static(self, x, cos, sin, mask, k_cache, v_cache, slot):
        a, k_cache, v_cache = self.self_attn.static(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, slot)
        x = x + self.post_self_attn_layernorm(a)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x))), k_cache, v_cache


class TextModel(nn.Cell):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def construct(self, input_ids, position_ids, mask=None, cache=None, pos=0):
        """input_ids (B, L), position_ids (3, B, L), mask bool (B, 1, L, S) or None -> (B, L, D)."""
        x = self.embed_tokens(input_ids)
        cos, sin = mrope_cos_sin(self.cfg, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, pos)
        return self.norm(x)


class ARModel(nn.Cell):
    """The trained part (`language_model` + `lm_head`): the AR training stage's module."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.language_model = TextModel(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vision_vocab_size, bias=False)

    def construct(self, input_ids, position_ids, mask=None, start: int = 0):
        """Logits (B, L - start, V) of the predicting positions (teacher forcing)."""
        return self.lm_head(self.language_model(input_ids, position_ids, mask)[:, start:])


class GlmImageAR(nn.Cell):
    """visual (ViT) + vqmodel (codebook) + language_model (GLM-4) + lm_head, named as the checkpoint."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.vqmodel = VQTokenizer(cfg.vq, cfg.vision.hidden_size)
        self.language_model = TextModel(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vision_vocab_size, bias=False)

    def construct(self, input_ids, position_ids, mask=None, cache=None, pos=0, last_only=False):
        h = self.language_model(input_ids, position_ids, mask, cache, pos)
        return self.lm_head(h[:, -1:] if last_only else h)

    def decode_static(self, tok, position_ids, mask, slot, ks: tuple, vs: tuple):
        """One decode step with the same shapes at every position (ms.jit compiles it once): tok (B, 1),
        position_ids (3, B, 1), mask (B, 1, 1, S), slot (S,) one-hot of the position; ks, vs the per-layer
        caches -> (logits (B, 1, V), new ks, new vs)."""
        lm = self.language_model
        x = lm.embed_tokens(tok)
        cos, sin = mrope_cos_sin(lm.cfg, position_ids, x.dtype)
        new_k, new_v = [], []
        for layer, k, v in zip(lm.layers, ks, vs):
            x, k, v = layer.static(x, cos, sin, mask, k, v, slot)
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(lm.norm(x)), tuple(new_k), tuple(new_v)

    def image_ids(self, pixels: Tensor) -> Tensor:
        """Source images (B, 3, H, W), normalised -> VQ ids (B, gh, gw)."""
        return self.vqmodel(self.visual(pixels))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg.text, batch, max_len, self.lm_head.weight.dtype)
