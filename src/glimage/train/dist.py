"""Process group and device mesh: the same path for one process and for `torchrun --nproc_per_node N`.

Under torchrun (RANK/WORLD_SIZE in the environment) the default group is initialised from the environment
with the backend of the device (`glimage.device.dist_backend`: nccl, hccl, gloo). A plain `python`/`glimage`
process gets a 1-rank group over an in-process HashStore (no port, nothing to clash with), so FSDP2, DCP and
the collectives below run exactly as with many ranks; with one rank they are identities.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..device import dist_backend, resolve_device


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    owns_group: bool  # we created the default group, so we destroy it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "") -> Dist:
    """Initialise (or join an already initialised) default group and a 1-D data-parallel mesh."""
    dev = resolve_device(device or None)
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched_by_torchrun() else 0
    if dev.type in ("cuda", "npu") and dev.index is None:
        dev = torch.device(dev.type, local_rank)  # one accelerator per local rank
    if dev.type in ("cuda", "npu"):
        getattr(torch, dev.type).set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = dist_backend(dev)
        if launched_by_torchrun():
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    world = dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return Dist(dist.get_rank(), world, local_rank, dev, mesh, owns)


def close(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    # gloo has no device; with nccl/hccl pass the device so the barrier does not guess one
    if d.device.type in ("cuda", "npu"):
        dist.barrier(device_ids=[d.device.index])
    else:
        dist.barrier()


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(t, op=op)
    return t


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj, d: Dist) -> list:
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
