"""The MindSpore models behind the interfaces the shared pipeline code calls (prior.run_prior,
sampling.generate_grid_tokens, glyph_text.encode_glyphs, GlmImagePipeline's stages).

Everything that is not a tensor program stays shared: prompt layout, tokenizers, size rules, the flow schedule
and every random draw. The draws (AR sampling, latent noise) come from the seeded torch CPU generators of the
PyTorch path, which define what a seed means (the reference's generator), so for one seed the two backends
differ only in their tensor programs. What crosses here are small host arrays: ids and positions in, the last
position's logits or one step's velocity out; the KV cache and the reference K/V stay MindSpore tensors.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
import torch

from ..models.dit import RefKV
from ..models.vae import DiagonalGaussian
from .layers import to_ms


def to_torch(x: ms.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.astype(ms.float32).asnumpy()
                                                 if x.dtype in (ms.bfloat16, ms.float16) else x.asnumpy()))


def _ms(x: torch.Tensor | None, dtype=None):
    return None if x is None else to_ms(x.detach().cpu().numpy(), dtype)


class _Bridge:
    device = torch.device("cpu")  # where the shared code keeps its tensors (and draws its random numbers)
    dtype = torch.float32

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self.ms_dtype = next(iter(model.get_parameters())).dtype


class ARBridge(_Bridge):
    """GlmImageAR's interface for run_prior / generate_grid_tokens."""

    def image_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        return to_torch(self.model.image_ids(_ms(pixels, self.ms_dtype))).long()

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    def compile(self):
        """A decode step for generate_grid_tokens(step=...) that MindSpore compiles once (graph mode): the
        cache keeps its full length, the token's slot and the visible keys are inputs, not shapes."""
        model = self.model

        @ms.jit
        def decode(tok, position_ids, mask, slot, ks, vs):
            return model.decode_static(tok, position_ids, mask, slot, ks, vs)

        def step(_, tok, position_ids, key_valid, cache, pos):
            slots = torch.arange(key_valid.shape[1])
            mask = (key_valid & (slots <= pos))[:, None, None, :]
            # mutable: a tuple argument is otherwise a constant of the graph (one compilation per step)
            logits, ks, vs = decode(_ms(tok[:, None]), _ms(position_ids), _ms(mask), _ms(slots == pos),
                                    ms.mutable(tuple(cache.k)), ms.mutable(tuple(cache.v)))
            cache.k, cache.v = list(ks), list(vs)
            return to_torch(logits)
        return step

    def __call__(self, input_ids, position_ids, mask=None, cache=None, pos=0, last_only=False) -> torch.Tensor:
        logits = self.model(_ms(input_ids), _ms(position_ids), _ms(mask), cache, pos, last_only)
        return to_torch(logits)


class GlyphBridge(_Bridge):
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return to_torch(self.model(_ms(ids), _ms(mask)))


class DiTBridge(_Bridge):
    """The denoiser and the reference-image write pass. Reference K/V travel as a torch RefKV (the pipeline
    joins and repeats them); their MindSpore copy is made once per RefKV, not per step."""

    def __init__(self, model):
        super().__init__(model)
        self._refs: tuple | None = None  # (key, MindSpore K/V, the RefKV kept alive so its id stays unique)
        self.forward = model  # enable_compile swaps in a graph-mode (ms.jit) forward

    def compile(self) -> None:
        """The denoiser in MindSpore's graph mode: compiled once per input shape (~2 s for the shipped model),
        then ~3x faster per call on a CPU; the same outputs within float rounding (~5e-6)."""
        model = self.model

        @ms.jit
        def forward(latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords, refs,
                    glyph_mask):
            return model(latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords,
                         refs, glyph_mask)

        self.forward = forward

    def _ms_refs(self, kv: RefKV | None, batch: int):
        if kv is None:
            return None
        key = (id(kv.k[0]), batch)  # the caller's RefKV: for_batch may make a new one at every step
        if self._refs is None or self._refs[0] != key:
            rows = kv.for_batch(batch)
            refs = ms.mutable([(_ms(k, self.ms_dtype), _ms(v, self.ms_dtype)) for k, v in zip(rows.k, rows.v)])
            self._refs = (key, refs, kv)  # mutable: a graph input, not a constant (see ARBridge.compile)
        return self._refs[1]

    def __call__(self, latents, glyph, prior_token_id, prior_token_drop, timestep, target_size, crop_coords,
                 kv: RefKV | None = None, glyph_mask=None) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        args = [_ms(latents, self.ms_dtype), _ms(glyph, self.ms_dtype), _ms(prior_token_id), _ms(prior_token_drop),
                _ms(timestep), _ms(target_size), _ms(crop_coords)]
        return to_torch(self.forward(*args, self._ms_refs(kv, latents.shape[0]), _ms(glyph_mask)))

    def encode_reference(self, latents, prior_token_id, target_size, crop_coords=None) -> RefKV:
        if crop_coords is None:
            crop_coords = torch.zeros(latents.shape[0], 2)
        out = self.model.encode_reference(_ms(latents, self.ms_dtype), _ms(prior_token_id), _ms(target_size),
                                          _ms(crop_coords))
        return RefKV([to_torch(k) for k, _ in out], [to_torch(v) for _, v in out])


class VAEBridge(_Bridge):
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = (to_torch(t) for t in ms.ops.chunk(self.model.encoder(_ms(x, self.ms_dtype)), 2, 1))
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return to_torch(self.model.decode(_ms(z, self.ms_dtype)))

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return to_torch(self.model.normalize_latents(_ms(z, self.ms_dtype)))

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return to_torch(self.model.denormalize_latents(_ms(z, self.ms_dtype)))
