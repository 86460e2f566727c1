"""The one device layer: CUDA, Ascend NPU, Apple MPS and CPU.

Everything else in glimage asks this module which device, dtype, distributed backend and memory
statistics to use, so that supporting an accelerator means editing this file only. Ascend support needs
Huawei's CANN plus `torch_npu` (installed by the user, matching their CANN); it is imported lazily and only
when asked for or when present, because a torch_npu without CANN breaks `import torch`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time

import torch

from .validate import InputError

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
    """"auto"/None = the best available; else cpu, cuda[:N], npu[:N] or mps, refused with a clear error when
    this machine lacks it."""
    if device is None or device == "auto":
        return default_device()
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "npu", "mps", "meta") or (index and not index.isdigit()):
        raise InputError(f"device {str(device)!r} is not one glimage runs on: use auto, cpu, cuda, cuda:N, npu, "
                         "npu:N or mps", "device")
    if kind in ("cuda", "npu", "mps"):
        ok = {"cuda": torch.cuda.is_available, "npu": npu_available, "mps": mps_available}[kind]()
        hint = " (Ascend needs torch_npu and CANN: see the README)" if kind == "npu" else ""
        if not ok:
            raise InputError(f"device {text!r} was asked for but is not available on this machine{hint}; "
                             f"available: {', '.join(available_devices())}", "device")
        count = torch.cuda.device_count() if kind == "cuda" else None
        if count is not None and index and int(index) >= count:
            raise InputError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}", "device")
    return torch.device(text)


def available_devices() -> list[str]:
    return ["cpu"] + [k for k, ok in (("cuda", torch.cuda.is_available()), ("npu", npu_available()),
                                      ("mps", mps_available())) if ok]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_bf16_matrix_units() -> bool:
    """True on CPUs with AMX (amx_bf16): bf16 matrix products run ~7x faster than fp32 there (measured: 1.5-1.6
    TFLOP/s on one core), while elsewhere bf16 is no faster or far slower (an AMD EPYC with avx512_bf16 but no
    AMX: bf16 matrix-vector products 7.7 GB/s against 17 GB/s in fp32, docs/speed.md)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """`auto` (or None): bf16 on accelerators, fp16 on MPS; on the CPU bf16 for a model stored in bf16 (the
    official folder) where the CPU has bf16 matrix units (AMX), fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type in ("cuda", "npu"):
            return torch.bfloat16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if stored == torch.bfloat16 and cpu_has_bf16_matrix_units() else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use auto or one of {', '.join(sorted(DTYPES))}", "dtype")
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


def busy_cpus(window: float = 0.05) -> float:
    """How many CPUs *other* work keeps busy now: the non-idle share of /proc/stat over `window` seconds, less
    this process's own CPU time (its threads may be busy starting up); 0 where /proc is absent."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return v[3] + v[4], sum(v[:8]), int(own[11]) + int(own[12])  # idle + iowait, all, utime + stime
    try:
        idle0, total0, own0 = sample()
        time.sleep(window)
        idle1, total1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0  # summed over CPUs, in the same clock ticks as a process's times
    if total <= 0:
        return 0.0
    busy = (total - (idle1 - idle0)) - (own1 - own0)
    return max(0.0, busy / total) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """Intra-op threads for CPU math that do not collapse under contention. An OpenMP region waits for its
    slowest thread, so a thread that shares its core with another process stalls every op: on a 2-core
    machine with one core busy, 2 threads drew an image of the shipped model ~50x slower than 1
    (scripts/bench_threads.py). So: the CPUs this process may use that are idle now, at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(usable, usable - math.ceil(busy_cpus() - 0.3)))


def set_threads(threads: int | str | None = "auto") -> int:
    """Set torch's intra-op thread count: an int, or "auto"/None (auto_threads(), unless OMP_NUM_THREADS
    is set: an explicit environment wins). Returns the count in effect."""
    if threads in (None, "auto"):
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = auto_threads()
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def manual_generator(device: torch.device, seed: int) -> torch.Generator:
    dev = device if device.type in ("cuda", "npu", "mps") else torch.device("cpu")
    return torch.Generator(dev).manual_seed(int(seed))
