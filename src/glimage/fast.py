"""Opt-in fast modes: faster than the exact path, at a measured cost in the image. Applied from outside the
models (`GlmImagePipeline.enable_fast`, `glimage generate --step-cache T --ar-int8`); the exact path is untouched
unless asked for. What each one changes, measured on a fixed prompt set, is in the README (scripts/bench_fast.py).

- StepCache (TeaCache / first-block-cache style): every step runs the DiT's first block; while the relative
  change of its residual, accumulated since the last full step, stays under `threshold`, the other blocks are
  skipped and their residual from that full step is reused. The conditional and unconditional branches keep
  their own caches. The first `warmup` steps always run in full.
- Int8Linear (weight-only int8, one scale per output channel): the AR decode reads a quarter of the bytes of
  float32 weights; products of a few rows run in torch's int8 x bfloat16 kernel, longer ones (the prefill)
  dequantize the weight once per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StepCache:
    def __init__(self, dit, threshold: float = 0.1, warmup: int = 2):
        self.dit, self.threshold, self.warmup = dit, threshold, warmup
        self.state: dict = {}
        self.branch = "cond"
        self.steps = self.skipped = 0
        self._forward, self._run_blocks = dit.forward, dit.run_blocks

    def install(self) -> "StepCache":
        self.dit.forward, self.dit.run_blocks = self.forward, self.run_blocks
        return self

    def remove(self) -> None:
        self.dit.forward, self.dit.run_blocks = self._forward, self._run_blocks

    def forward(self, latents, glyph, prior_token_id, prior_token_drop, timestep, *args, **kwargs):
        # the unconditional branch drops every prior token: that tells the two branches apart
        drop = prior_token_drop is not None and bool(prior_token_drop.all())
        self.branch = "uncond" if drop else "cond"
        st = self.state.get(self.branch)
        t = float(timestep.reshape(-1)[0])
        if st is not None and t >= st["t"]:  # timesteps only fall within a trajectory: a new image begins
            self.state.pop(self.branch)
        self.t = t
        return self._forward(latents, glyph, prior_token_id, prior_token_drop, timestep, *args, **kwargs)

    def run_blocks(self, s, n_text, temb, rope, refs, key_mask):
        blocks = self.dit.transformer_blocks
        first, _, _ = blocks[0](s, n_text, temb, rope, refs[0], key_mask)
        r0 = first - s
        st = self.state.get(self.branch)
        self.steps += 1
        if st is not None and st["rest"].shape == first.shape and st["n"] >= self.warmup:
            change = ((r0 - st["r0"]).abs().mean() / st["r0"].abs().mean().clamp_min(1e-12)).item()
            if st["acc"] + change < self.threshold:
                self.skipped += 1
                st.update(r0=r0, acc=st["acc"] + change, t=self.t, n=st["n"] + 1)
                return first + st["rest"]
        x = first
        for block, ref in zip(blocks[1:], refs[1:]):
            x, _, _ = block(x, n_text, temb, rope, ref, key_mask)
        self.state[self.branch] = {"r0": r0, "rest": x - first, "acc": 0.0, "t": self.t,
                                   "n": (st["n"] + 1) if st is not None else 1}
        return x


class Int8Linear(nn.Module):
    """Weight-only int8 Linear (symmetric, one scale per output channel); inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("scale_f", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._dtype = linear.weight.dtype

    @property
    def weight(self) -> torch.Tensor:
        """An empty stand-in: callers read only its device and dtype (the compute dtype)."""
        return torch.empty(0, dtype=self._dtype, device=self.weight_int8.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= 16:  # decode: the int8 x bf16 kernel reads the int8 weight directly
            y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.weight_int8, self.scale)
            y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        else:  # prefill: dequantize once for this call
            y = F.linear(x, self.weight_int8.to(x.dtype) * self.scale_f[:, None].to(x.dtype))
        return y if self.bias is None else y + self.bias


def quantize_int8(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by an Int8Linear; returns how many."""
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            n += 1
        else:
            n += quantize_int8(child)
    return n
