"""The one device layer: CUDA, Ascend NPU, Apple MPS and CPU.

Everything else in glimage asks this module which device, dtype, distributed backend and memory
statistics to use, so that supporting an accelerator means editing this file only. Ascend support needs
Huawei's CANN plus `torch_npu` (installed by the user, matching their CANN); it is imported lazily and only
when asked for or when present, because a torch_npu without CANN breaks `import torch`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_NPU_READY: bool | None = None


def npu_available() -> bool:
    global _NPU_READY
    if _NPU_READY is None:
        _NPU_READY = False
        if importlib.util.find_spec("torch_npu") is not None:
            try:
                import torch_npu  # noqa: F401  (registers the "npu" device type)
                _NPU_READY = bool(torch.npu.is_available())
            except Exception:  # CANN missing or mismatched: treat as absent
                _NPU_READY = False
    return _NPU_READY


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if npu_available():
        return torch.device("npu")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    device = torch.device(device)
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_available(), "npu": None, "meta": True}
    if device.type == "npu":
        ok["npu"] = npu_available()
    if device.type not in ok:
        raise ValueError(f"device {str(device)!r} is not supported; use one of cpu, cuda, npu, mps")
    if not ok[device.type]:
        raise ValueError(f"device {str(device)!r} was asked for but is not available on this machine")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on the CPU (CPU bf16 matmuls are ~100x slower than fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type in ("cuda", "npu"):
            return torch.bfloat16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dist_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def _module(device: torch.device):
    return getattr(torch, device.type, None) if device.type in ("cuda", "npu", "mps") else None


def synchronize(device: torch.device) -> None:
    mod = _module(device)
    if mod is not None:
        mod.synchronize()


def empty_cache(device: torch.device) -> None:
    mod = _module(device)
    if mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak RSS on the CPU."""
    mod = _module(device)
    if mod is not None and hasattr(mod, "max_memory_allocated"):
        return int(mod.max_memory_allocated())
    if os.name == "posix":
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0


def manual_generator(device: torch.device, seed: int) -> torch.Generator:
    dev = device if device.type in ("cuda", "npu", "mps") else torch.device("cpu")
    return torch.Generator(dev).manual_seed(int(seed))
