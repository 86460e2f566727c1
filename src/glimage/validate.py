"""One layer of input checks, shared by the CLI, the Python API and the server.

Every check raises `InputError` (a ValueError) whose message names the bad value, the allowed range and,
where it helps, the fix; `param` names the argument, so the server can put it in OpenAI's error body. The
CLI turns InputError into exit status 2 and a one-line message, the server into a 4xx answer. Anything else
that escapes is a bug, reported as such.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
MAX_STEPS = 1000  # one per training timestep of the flow schedule
MAX_GUIDANCE = 50.0  # GLM-Image uses 1.5; far beyond ~20 every image saturates
MAX_IMAGES = 64  # images per prompt in one call (they are denoised as one batch)
MAX_SOURCE_PIXELS = 8192 * 8192  # sources are resized to at most 2048^2 anyway; larger is a decompression bomb
MAX_SOURCE_IMAGES = 8


class InputError(ValueError):
    """Bad input from the user (argument, file, model folder): the message says what and how to fix it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not 1.5) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}={_show(value)} must be an integer{_range(lo, hi)}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{name}={value} is out of range: it must be an integer{_range(lo, hi)}", name)
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}={_show(value)} must be a number{_range(lo, hi, lo_open)}", name)
    value = float(value)
    if (not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and value > hi)):
        raise InputError(f"{name}={value:g} is out of range: it must be a finite number{_range(lo, hi, lo_open)}",
                         name)
    return value


def _range(lo, hi, lo_open: bool = False) -> str:
    num = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731 - ints in full: 2**63 - 1, not 9.2e18
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{num(lo)}, {num(hi)}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {num(lo)}"
    return f" <= {num(hi)}" if hi is not None else ""


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise InputError(f"{name}={_show(value)} must be one of {', '.join(map(repr, choices))}", name)
    return value


def check_text(name: str, value) -> str:
    """A str that is valid Unicode: command-line bytes that are not UTF-8 arrive as lone surrogates."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__} {_show(value)}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        try:  # command-line bytes that are not UTF-8: the bytes themselves
            bad = value[e.start:e.end].encode("utf-8", "surrogateescape")
            raw = _show(value.encode("utf-8", "surrogateescape"))
        except UnicodeEncodeError:  # a lone surrogate sent as such (JSON "\\ud800"): no bytes to show
            raise InputError(f"{name} is not valid Unicode text: lone surrogate U+{ord(value[e.start]):04X} at "
                             f"character {e.start}; pass text in UTF-8", name) from None
        raise InputError(f"{name} is not valid UTF-8: byte(s) {bad.hex(' ')} at character {e.start} of {raw}; "
                         "pass text in UTF-8", name) from None
    if "\x00" in value:
        raise InputError(f"{name} contains a NUL character at {value.index(chr(0))}; remove it", name)
    return value


def check_prompt(value, max_chars: int | None = None, name: str = "prompt") -> str:
    """One prompt, as the CLI, the Python API and the server take it: a string of valid Unicode without NUL
    (check_text), not empty or only whitespace (the model would draw something unasked for), and at most
    `max_chars` characters when given."""
    value = check_text(name, value)
    if not value.strip():
        raise InputError(f"{name} is empty{' (only whitespace)' if value else ''}: describe the image to draw", name)
    if max_chars is not None and len(value) > max_chars:
        raise InputError(f"{name} is {len(value)} characters long; at most {max_chars}", name)
    return value


def check_prompts(prompt, max_chars: int | None = None) -> list[str]:
    """A prompt or a non-empty list of prompts -> the list, each one checked by check_prompt."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"prompt must be a string or a non-empty list of strings, got {_show(prompt)}", "prompt")
    return [check_prompt(p, max_chars) for p in prompts]


def parse_size(text, name: str = "--size") -> tuple[int, int]:
    """"WIDTHxHEIGHT" (OpenAI's order, as `glimage bench`, `glimage generate --size` and the server take it)
    -> (height, width). Whether the model draws that size is check_target_size's question."""
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text) if isinstance(text, str) else None
    if not m:
        raise InputError(f"{name} {_show(text)} must be WIDTHxHEIGHT in pixels, e.g. 128x128", name.lstrip("-"))
    return int(m.group(2)), int(m.group(1))


def check_seed(seed, count: int = 1) -> int:
    """A seed for `count` draws S, S+1, ...: all of them fit a torch generator."""
    return check_int("seed", seed, 0, MAX_SEED - (count - 1))


def check_target_size(height, width, cfg, text_to_image: bool = True) -> None:
    """The size of the image to generate, for a model whose ARConfig is `cfg`, by arithmetic alone (nothing
    is allocated before it passes). Refused where it cannot work: not a multiple of the grid factor, outside
    the model's range (the folder's stated one, e.g. Zhipu's [512, 2048] for the official model, else the
    largest side whose tokens fit the AR's context), a preview grid of zero tokens, or more image tokens than
    the context holds. The prompt's share of the context is checked with the prompt (prompt.build_prompts)."""
    f = cfg.grid_factor
    lo, hi = cfg.size_range
    for name, v in (("height", height), ("width", width)):
        check_int(name, v)
        if v < lo or v % f or v > hi:
            near = min(max(lo, round(v / f) * f), hi)
            why = "" if cfg.max_size is not None else \
                f"; {hi} is the longest side whose tokens fit the model's context of {cfg.text.max_position_embeddings}"
            raise InputError(f"{name}={v} is not a size this model draws: it must be a multiple of {f} in [{lo}, "
                             f"{hi}] (e.g. {name}={near}){why}", name)
    if text_to_image:
        th, tw = height // f, width // f
        if int(math.sqrt(th / tw) * cfg.preview_side) < 1 or int(math.sqrt(tw / th) * cfg.preview_side) < 1:
            raise InputError(f"{height}x{width} is too elongated: its preview grid would have no tokens "
                             f"(aspect ratio at most {cfg.preview_side ** 2} for this model)", "size")
    limit = cfg.text.max_position_embeddings
    need = cfg.image_tokens(height, width, text_to_image)
    if need >= limit:
        side = f
        while cfg.image_tokens(side + f, side + f, text_to_image) < limit:
            side += f
        raise InputError(f"{height}x{width} needs {need} image tokens, beyond the model's context of {limit} "
                         f"tokens (the largest square is {side}x{side})", "size")


def default_size(cfg, defaults: dict, source: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) of an image when the caller gives none. Text-to-image: the folder's default (glimage.json's
    height and width), else 1024 within the model's range; an edit: its first source's (width, height) snapped
    to the grid and the range. Shared by the pipeline, the CLI's early checks and the server."""
    (lo, hi), f = cfg.size_range, cfg.grid_factor
    if source is not None:
        w, h = source
        return min(max(h // f * f, lo), hi), min(max(w // f * f, lo), hi)
    if "height" in defaults and "width" in defaults:
        return defaults["height"], defaults["width"]
    side = min(max(1024, lo), hi)
    return side, side


def check_output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """The files `count` images will be written to (out.png, or out_0.png ... for several), checked before
    any work: a known image suffix, not a directory, in a folder that exists (or can be made) and accepts
    a new file. Nothing is left behind by the check."""
    out = Path(output)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"output {str(out)!r} must end in {', '.join(IMAGE_SUFFIXES)}", "output")
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]
    for path in paths:
        if path.is_dir():
            raise InputError(f"output {str(path)!r} is a directory; name a file such as {str(path / 'out.png')!r}",
                             "output")
    parent = out.parent
    existing = next(p for p in [parent, *parent.parents] if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise InputError(f"output {str(out)!r} cannot be created: {str(existing)!r} is a file, not a folder",
                         "output")
    probe_dir = parent if parent.is_dir() else existing
    probe = probe_dir / f".glimage-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"output {str(out)!r} cannot be written: folder {str(probe_dir)!r} is not writable "
                         f"({e.strerror})", "output") from None
    return paths


def check_fields(cls, values: dict, where: str) -> dict:
    """`values` for dataclass `cls`, each checked against the field's annotation (int, float, bool, str,
    tuple, dict, optional): a config file or `--set` of the wrong type is refused with the key and the
    expected type instead of failing somewhere inside. Ints are accepted for floats (and made floats)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in names:
            raise InputError(f"{where}: unknown key {key!r}; known keys: {sorted(names)}", key)
        out[key] = _coerce(hints[key], value, f"{where}: {key}")
    return out


def check_dataclass(obj, where: str = "") -> None:
    """Every field of a (nested) config dataclass has its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_dataclass(value, f"{where}{f.name}.")
        else:
            _coerce(hints[f.name], value, f"{where}{f.name}")


def _coerce(tp, value, what: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, tp):
        return value
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    if tp in ok:
        if not ok[tp](value):
            raise InputError(f"{what}={_show(value)} must be {_TYPE_NAMES[tp]}, got {type(value).__name__}")
        if tp is float and not math.isfinite(value):
            raise InputError(f"{what}={_show(value)} must be a finite number")
        return float(value) if tp is float else value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{what}={_show(value)} must be a list, got {type(value).__name__}")
        item = args[0] if args else None
        return tuple(_coerce(item, v, what) if item not in (None, Ellipsis) else v for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"{what}={_show(value)} must be a table, got {type(value).__name__}")
        return value
    return value


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
