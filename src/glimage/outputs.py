"""Generated images on their way out: encoded with their generation parameters, written atomically.

Every image carries the parameters that reproduce it (prompt, seed, steps, guidance, size, model, glimage
version) as JSON: in a PNG `iTXt` chunk named "glimage" (plus a readable "parameters" chunk, the name other
image tools show), and in JPEG / WebP EXIF (ImageDescription). `read_parameters` gets them back;
`glimage info IMAGE` prints them.

Files are written to a hidden temporary name beside the target and renamed, so an interrupted run never
leaves a partial image under the target's name; the temporary file is created with the user's umask (not
0600 like mkstemp) and removed on any error, SIGTERM included (the CLI turns SIGTERM into SystemExit).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path

from PIL import Image, PngImagePlugin

from .validate import InputError

KEY = "glimage"
EXIF_DESCRIPTION = 0x010E
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def describe(params: dict) -> str:
    """One readable line: the prompt, then key: value pairs."""
    rest = ", ".join(f"{k}: {v}" for k, v in params.items() if k != "prompt")
    return f"{params.get('prompt', '')}\n{rest}"


def encode_image(image: Image.Image, fmt: str = "PNG", params: dict | None = None, quality: int | None = None) -> bytes:
    """`image` as PNG, JPEG or WEBP bytes, with `params` embedded. quality: JPEG/WebP quality (0-100)."""
    fmt = fmt.upper()
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise InputError(f"output format {fmt!r} must be png, jpeg or webp", "output_format")
    buf = io.BytesIO()
    kw: dict = {}
    if fmt == "PNG":
        text = json.dumps(params, ensure_ascii=False, sort_keys=True) if params else None  # iTXt is UTF-8
        if text:
            info = PngImagePlugin.PngInfo()
            info.add_itxt(KEY, text)
            info.add_itxt("parameters", describe(params))
            kw["pnginfo"] = info
    else:
        text = json.dumps(params, sort_keys=True) if params else None  # EXIF text is ASCII: \u escapes
        if quality is not None:
            kw["quality"] = int(quality)
        if text:
            exif = Image.Exif()
            exif[EXIF_DESCRIPTION] = text
            kw["exif"] = exif.tobytes()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike, params: dict | None = None) -> Path:
    """Write `image` to `path` (format from the suffix) atomically; errors name `path`, not a temp file."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {str(path)!r} must end in {', '.join(FORMATS)}", "output")
    return write_file(path, encode_image(image, fmt, params))


def write_file(path: str | os.PathLike, data: bytes, param: str = "output") -> Path:
    """Write `data` to `path` atomically (a crash leaves the old file or the new one, never a part), with the
    umask's permissions; errors name `path`, not a temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, like open()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {str(path)!r}: {e.strerror or e}", param) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_parameters(path: str | os.PathLike) -> dict | None:
    """The generation parameters embedded in an image file by glimage, or None if it carries none."""
    try:
        with Image.open(path) as im:
            text = im.info.get(KEY) if im.format == "PNG" else im.getexif().get(EXIF_DESCRIPTION)
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {str(path)!r}: {e}") from None
    if not text:
        return None
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        return None
    return params if isinstance(params, dict) else None
