"""Safetensors folders in the official (transformers/diffusers) layout: strict loading and sharded saving.

Models are built on the meta device and the checkpoint's tensors are read straight onto the target
device in the target dtype, then assigned (`load_state_dict(assign=True)`): no full-size copy on the CPU
first and no random initialisation of a 17 B-parameter model. Loading is strict: every tensor of the
checkpoint is used, none is missing, every shape matches; the error names the offending keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from .validate import InputError, check_dataclass

WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(InputError):
    """A model folder that cannot be used as it is: a missing, unreadable or inconsistent file."""


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file, with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({{...}}), got a {type(obj).__name__}")
    return obj


def read_config(path: str | os.PathLike, parse: Callable[[dict], object]):
    """`parse(read_json(path))`, with the file named in any error: a config of the right JSON but wrong
    content (a missing key, a string where a number belongs) is bad input, not a crash somewhere later.
    A dataclass result has each field's type checked against its annotation."""
    d = read_json(path)
    try:
        cfg = parse(d)
        if dataclasses.is_dataclass(cfg):
            check_dataclass(cfg)
        return cfg
    except InputError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{path} is not a valid config: {what}") from None


def _open(path: Path, device: str = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes: {e}); the download may "
                              "be incomplete: fetch the file again") from None


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors shards of one component folder (single file or sharded with an index)."""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are not there: {missing}")
            return [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)} and their .index.json)")


def read_state_dict(folder: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a component folder (only those whose names start with one of `prefixes`, if given),
    loaded onto `device`; floating tensors cast to `dtype`."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        # safetensors reads straight into the device's memory; "cpu" for meta/other devices
        load_dev = str(device) if device.type in ("cpu", "cuda") else "cpu"
        with _open(path, load_dev) as f:
            for key in f.keys():
                if prefixes and not key.startswith(prefixes):
                    continue
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{path}: tensor {key!r} is not readable ({e})") from None
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[key] = t.to(device)
    return out


_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                 "U8": "u1", "BOOL": "?"}


def read_arrays(folder: str | os.PathLike) -> dict[str, "np.ndarray"]:
    """The tensors of a component folder as numpy arrays, without torch (the MindSpore backend's loader).
    safetensors' own numpy reader has no bfloat16 (numpy lacks it), the official weights' dtype: the file
    format is a JSON header and raw little-endian data, so it is read here and bf16 widened exactly to fp32."""
    import numpy as np
    out = {}
    for path in weight_files(folder):
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                raw, shape = data[begin:end], tuple(info["shape"])
                if info["dtype"] == "BF16":  # the high half of an fp32
                    a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    a = raw.view(_NUMPY_DTYPES[info["dtype"]])
                out[key] = np.array(a.reshape(shape))  # a copy: the map closes with the file
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            size = path.stat().st_size if path.exists() else 0
            raise CheckpointError(f"{path} is not a readable safetensors file ({size} bytes: {type(e).__name__}: "
                                  f"{e}); the download may be incomplete: fetch the file again") from None
    return out


def tensor_headers(folder: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a component folder, read from the headers only."""
    out = {}
    for path in weight_files(folder):
        with _open(path) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def stored_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The dtype most of a component folder's weights are stored in (from the headers), None if unknown."""
    from collections import Counter
    kinds = Counter(dtype for _, dtype in tensor_headers(folder).values())
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    return names.get(kinds.most_common(1)[0][0]) if kinds else None


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Assign `state_dict` to `model` (built on meta or not); every key used, none missing, shapes equal."""
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {list_head(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {list_head(extra)}")
    if shapes:
        problems.append(f"{len(shapes)} misshaped tensor(s): {list_head(shapes)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def list_head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str | os.PathLike,
                    name: str = "model.safetensors", max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `state_dict` as one file, or as shards plus `<name>.index.json` like transformers/diffusers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / name), metadata={"format": "pt"})
        return
    stem, ext = name.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(folder / f"{name}.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


class _NoInit(TorchFunctionMode):
    """In-place initialisers (normal_, kaiming_uniform_, zero_ ...) of meta tensors return at once: there is
    nothing to fill, and torch._refs' meta normal_ imports torch._dynamo (~1 s of every CLI run)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if name.endswith("_") and not name.startswith("_") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_on_meta(factory: Callable[[], nn.Module], what: str = "model") -> nn.Module:
    """The module on the meta device (no memory, no init). A config that passed its checks but describes
    no buildable module (a zero or negative width) is reported as the folder's fault."""
    try:
        with torch.device("meta"), _NoInit():
            return factory()
    except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as e:
        if isinstance(e, InputError):
            raise
        raise CheckpointError(f"{what}: its config describes no buildable model ({type(e).__name__}: {e})") from None


def rename(state_dict: dict[str, torch.Tensor], fn: Callable[[str], str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        nk = fn(k)
        if nk in out:
            raise CheckpointError(f"two checkpoint tensors map to the same key {nk!r}")
        out[nk] = v
    return out


def param_count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)
