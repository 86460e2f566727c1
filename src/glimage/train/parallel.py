"""Parallelism applied from outside the model: activation checkpointing, torch.compile and FSDP2, per block.

Models know nothing of this. A stage names its repeated units (`stage.blocks(model)`); each gets
  1. activation checkpointing: its forward is recomputed in backward instead of keeping activations,
  2. optionally torch.compile of its forward,
  3. FSDP2 `fully_shard` with a MixedPrecisionPolicy (compute in `dtype`, reduce gradients in fp32),
then the root is sharded so every remaining parameter (embeddings, heads, norms) is covered too.

Checkpointing and compile replace the block's bound `forward` (an instance attribute) rather than wrapping
the module in CheckpointWrapper / OptimizedModule: parameter names stay exactly the model's own, so state
dicts, DCP checkpoints and the export need no prefix juggling. FSDP2's hooks run in `Module.__call__`,
around the replaced forward, so the recomputation in backward sees the unsharded parameters that FSDP2's
pre-backward hook gathered.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


def _checkpointed(fn):
    @functools.wraps(fn)
    def forward(*args, **kwargs):
        # non-reentrant: supports kwargs, inputs without grad, and nested autograd (the recommended mode);
        # the RNG state is preserved so dropout inside a block recomputes identically
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return forward


def parallelize(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, dtype: torch.dtype,
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Shard `model` in place (FSDP2 per block, then the root); returns it (now an FSDPModule)."""
    members = {id(m) for m in model.modules()}
    for i, block in enumerate(blocks):
        if id(block) not in members:
            raise ValueError(f"stage.blocks()[{i}] ({type(block).__name__}) is not a submodule of the model")
    if len({id(b) for b in blocks}) != len(blocks):
        raise ValueError("stage.blocks() lists a module twice")
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(blocks):
        fn = block.forward
        if compile:
            fn = torch.compile(fn)
        if activation_checkpointing:
            fn = _checkpointed(fn)
        if fn is not block.forward:
            block.forward = fn
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
