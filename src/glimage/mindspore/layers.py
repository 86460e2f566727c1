"""MindSpore building blocks with torch.nn's parameter names and layouts, so that one state dict (and one key
map, glimage.convert) serves both backends: Linear (out, in) + bias, Embedding (n, d), Conv2d (out, in, k, k),
GroupNorm / LayerNorm weight + bias.

Only ops with CPU kernels in MindSpore 2.10 are used (docs/mindspore.md): the `mint` LayerNorm, Embedding,
IndexSelect and ArgMin kernels are missing on CPU, so layer norm is written out and lookups use `ops.gather`.
Parameters start as lazy zeros (ones for norms), allocated only when assigned: a model gets its values from a checkpoint (weights.py) or from the torch model of the
same config (training builds the torch module for its seeded initialisation, then copies it).
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops
from mindspore.common.initializer import initializer

NEG_INF = float("-inf")


def _zeros(*shape: int) -> Parameter:
    return Parameter(initializer("zeros", shape, ms.float32))  # lazy: no memory until a value is assigned


def ones(dim: int) -> Parameter:
    return Parameter(initializer("ones", (dim,), ms.float32))


_MATMUL_NT = ops.MatMul(transpose_b=True)


class Linear(nn.Cell):
    """y = x W^T + b through the MatMul primitive with transpose_b: MindSpore 2.10's CPU `dense` (mint.linear)
    is 20-60x slower at these shapes (a 256 -> 16512 head on one row: 19.9 ms vs 0.6 ms; torch 0.37 ms)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.weight = _zeros(dim_out, dim_in)
        self.bias = _zeros(dim_out) if bias else None

    def construct(self, x: Tensor) -> Tensor:
        y = _MATMUL_NT(x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Embedding(nn.Cell):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = _zeros(num, dim)

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


class Conv2d(nn.Cell):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = _zeros(c_out, c_in, kernel, kernel)
        self.bias = _zeros(c_out)
        self.stride, self.padding = stride, padding
        self.by_matmul = ms.get_context("device_target") == "CPU"  # fixed at construction: a graph constant

    def construct(self, x: Tensor) -> Tensor:
        if self.by_matmul:
            return conv2d_matmul(x, self.weight, self.bias, self.stride, self.padding)
        mode = "pad" if self.padding else "valid"
        return ops.conv2d(x, self.weight, self.bias, stride=self.stride, pad_mode=mode, padding=self.padding)


def conv2d_matmul(x: Tensor, w: Tensor, b: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """Convolution as shifted views + one matmul (im2col). MindSpore 2.10's CPU conv kernel is ~70x slower than
    torch's (a 64-channel 3x3 conv at 64x64: 227 ms vs 3.3 ms); this runs it in 22 ms, within 1e-6 relative."""
    B, C, H, W = x.shape
    out, _, k, _ = w.shape
    if padding:
        x = ops.pad(x, (padding,) * 4)
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    if k == 1 and stride == 1:
        cols = x.reshape(B, C, ho * wo)
    else:  # (B, C, k*k, ho, wo): tap (i, j) is the input shifted by (i, j), in the weight's (C, kh, kw) order
        taps = []
        for t in range(k * k):  # one loop, not two: MindSpore's graph compiler parses single comprehensions only
            i, j = t // k, t % k
            taps.append(x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride])
        cols = ops.stack(taps, 2).reshape(B, C * k * k, ho * wo)
    y = ops.matmul(w.reshape(out, -1), cols) + b[:, None]  # (B, out, ho*wo)
    return y.reshape(B, out, ho, wo)


class GroupNorm(nn.Cell):
    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = _zeros(channels)
        self.bias = _zeros(channels)

    def construct(self, x: Tensor) -> Tensor:  # (B, C, ...)
        return mint.nn.functional.group_norm(x, self.groups, self.weight, self.bias, self.eps)


def layer_norm(x: Tensor, eps: float) -> Tensor:
    """Over the last axis, without affine parameters, statistics in the input's dtype (like torch's kernel)."""
    mean = x.mean(-1, keep_dims=True)
    xc = x - mean
    return xc * ops.rsqrt((xc * xc).mean(-1, keep_dims=True) + eps)


class LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _zeros(dim)
        self.bias = _zeros(dim)

    def construct(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.eps) * self.weight + self.bias


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
              scale: float | None = None) -> Tensor:
    """torch's scaled_dot_product_attention: q (B, H, L, d), k/v (B, K, S, d) with H a multiple of K (GQA
    without repeating K/V); mask bool (True = attend) or additive float, broadcast to (B, H, L, S)."""
    B, H, L, d = q.shape
    K, S = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(B, K, H // K, L, d)  # heads grouped by their KV head
    scores = ops.matmul(qg * scale, k.swapaxes(-1, -2)[:, :, None])  # (B, K, H/K, L, S)
    scores = scores.reshape(B, H, L, S).astype(ms.float32)
    if causal:
        keep = Tensor(np.tril(np.ones((L, S), np.bool_), S - L))
        scores = ops.masked_fill(scores, ~keep, NEG_INF)
    if mask is not None:
        if mask.dtype == ms.bool_:
            scores = ops.masked_fill(scores, ~mask, NEG_INF)
        else:
            scores = scores + mask.astype(ms.float32)
    p = ops.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, H // K, L, S)
    return ops.matmul(p, v[:, :, None]).reshape(B, H, L, d)


def to_ms(x, dtype=None) -> Tensor:
    """A numpy array (or anything np.asarray takes) -> a MindSpore tensor, floats cast to `dtype` if given."""
    a = np.ascontiguousarray(np.asarray(x))
    t = Tensor(a)
    return t.astype(dtype) if dtype is not None and a.dtype.kind == "f" else t
