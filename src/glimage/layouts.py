"""Weight layouts the CPU reads fastest, per dtype, applied from outside the models (GlmImagePipeline on the CPU).

The AR decode reads every weight once per token, so the layout a matrix-vector product streams fastest decides
its speed (docs/speed.md, `scripts/bench_matvec.py`):
- fp32: column-major weights (the transpose of a contiguous (in, out) tensor) stream faster on some Intel CPUs
  (1.99 -> 1.39 s per decode at preset `mid`, the same tokens) and as fast elsewhere;
- bf16: weights reordered once into oneDNN's blocked layout (what torch.compile's freezing does) run the
  product 1.4-1.7x faster than F.linear, which reorders the row-major weight on every call, with the same
  bits out (tested). Column-major makes bf16 1.4-2.2x slower.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


def column_major_linears(module: nn.Module) -> nn.Module:
    """Store each fp32 Linear's weight (out, in) column-major: same values, names and shapes (save_pretrained
    writes it back contiguous), but F.linear hands MKL the layout it streams faster."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.is_contiguous() and m.weight.dtype == torch.float32:
            m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=m.weight.requires_grad)
    return module


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs blocked `dtype` weights on this CPU: bf16 where the CPU has avx512 (bf16 or
    AMX), fp16 only with avx512_fp16/AMX-fp16; fp32 stays with F.linear, whose fp32 products are already
    memory-bound and whose bits the fp32 parity with the reference depends on."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


_PACKING = threading.Lock()


class PackedLinear(nn.Module):
    """An inference-only Linear whose weight is held in oneDNN's blocked layout, reordered at its first call
    (so that loading stays as fast as the plain weights', and a pipeline whose AR never runs never pays).

    The state dict still holds a plain `weight` (out, in), so checkpoints, save_pretrained and strict loading see
    an nn.Linear; `weight` gives the plain tensor for callers that read values (int8 quantisation, saving),
    never on the forward path."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("plain", linear.weight.detach(), persistent=False)  # until the first call
        self.register_buffer("packed", None, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.plain if self.packed is None else self.packed.to_dense()

    @property
    def dtype(self) -> torch.dtype:
        return (self.plain if self.packed is None else self.packed).dtype

    def _pack(self) -> torch.Tensor:
        with _PACKING:  # two threads calling the same pipeline first: one reorders, the other waits for it
            if self.packed is None:
                self.packed, self.plain = torch.ops.mkldnn._reorder_linear_weight(self.plain, None), None
            return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed if self.packed is not None else self._pack()
        if x.dtype != packed.dtype:  # oneDNN wants matching dtypes; let F.linear name the mismatch
            return F.linear(x, packed.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            w = state_dict[prefix + "weight"]
            if w.shape != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: {tuple(w.shape)} in the checkpoint, "
                                  f"{(self.out_features, self.in_features)} here")
            else:
                self.plain, self.packed = w.detach().to(self.dtype).clone(), None  # packed at the next call
        elif strict:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")
        if strict:
            known = {prefix + "weight", prefix + "bias"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.dtype}, layout=onednn-blocked"


def packed(linear: nn.Module) -> nn.Module:
    """`linear` as a PackedLinear where oneDNN runs its dtype on this CPU, else unchanged."""
    if isinstance(linear, nn.Linear) and linear.weight.device.type == "cpu" and can_pack(linear.weight.dtype):
        return PackedLinear(linear)
    return linear


def pack_linears(module: nn.Module) -> int:
    """Replace every Linear under `module` (not `module` itself) by `packed(linear)`; returns how many changed."""
    n = 0
    for name, child in module.named_children():
        new = packed(child)
        if new is not child:
            setattr(module, name, new)
            n += 1
        else:
            n += pack_linears(child)
    return n


def unpack_linears(module: nn.Module) -> nn.Module:
    """Every PackedLinear under `module` (and `module` itself) back to a plain nn.Linear, e.g. before
    torch.compile, whose graphs cannot take oneDNN's opaque tensors (inductor packs weights itself)."""
    if isinstance(module, PackedLinear):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta", dtype=module.dtype)
        linear.weight = nn.Parameter(module.weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        return linear
    for name, child in module.named_children():
        new = unpack_linears(child)
        if new is not child:
            setattr(module, name, new)
    return module


def tune_linears_for_cpu(module: nn.Module) -> nn.Module:
    """The measured-fastest layout for each Linear under `module` (not `module` itself): packed where oneDNN
    runs its dtype, column-major fp32 otherwise."""
    pack_linears(module)
    return column_major_linears(module)
