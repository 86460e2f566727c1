"""The OpenAI Images API's request fields -> a checked `Spec`, and images -> OpenAI's response objects and
stream events.

The checks are glimage.validate's (those of the CLI and the Python API), plus the server's own limits (n,
prompt length, number, formats and total pixels of source images, and the request's cost). All of them are
arithmetic on the fields and on the uploads' headers: a request is refused before any of its work is done.
Fields OpenAI defines that GLM-Image cannot honour are refused with a 400 that says so (a mask, a transparent
background, a quality level), never ignored; the
extensions vLLM-Omni defines (`seed`, `num_inference_steps`, `guidance_scale`, sent by the official client
through `extra_body`) are accepted, and `progress_events` (glimage's) adds per-step progress to a stream.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass, field

from ..image import image_size, load_image, smart_resize
from ..outputs import encode_image
from ..prompt import build_prompts
from ..validate import (MAX_GUIDANCE, MAX_SOURCE_IMAGES, MAX_SOURCE_PIXELS, InputError, check_choice, check_float,
                        check_int, check_prompt, check_seed, check_target_size)

FORMATS = ("PNG", "JPEG", "WEBP")  # what edits take: PIL's other decoders (EPS through Ghostscript...) are never tried

COMMON = {"prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "user", "stream",
          "partial_images", "quality", "background", "safety_identifier",
          "seed", "num_inference_steps", "guidance_scale", "progress_events"}
FIELDS = {"generate": COMMON | {"moderation", "style"}, "edit": COMMON | {"image", "image[]", "mask", "input_fidelity"}}
INTS = {"n", "output_compression", "partial_images", "seed", "num_inference_steps"}
BOOLS = {"stream", "progress_events"}


class ApiError(Exception):
    """An answer other than 200, as OpenAI writes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_n: int = 8
    max_prompt_chars: int = 4000
    max_images: int = MAX_SOURCE_IMAGES
    max_pixels: int = MAX_SOURCE_PIXELS  # one source image
    max_source_pixels: int = MAX_SOURCE_PIXELS  # all of a request's source images together (decoded RGB: 3 B/px)
    # A request's cost in images at the model's default size and steps: n * steps / default steps * pixels /
    # default pixels. None: max_n (max_n default images, the most a request could ask for at the defaults).
    max_cost: float | None = None
    max_body_bytes: int = 25 * 2**20
    timeout: float = 600.0  # seconds a request may take, queue included

    @property
    def cost(self) -> float:
        return float(self.max_n) if self.max_cost is None else self.max_cost


@dataclass
class Spec:
    kind: str  # "generate" | "edit"
    prompt: str
    n: int
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    response_format: str = "b64_json"
    output_format: str = "png"
    compression: int | None = None
    stream: bool = False
    partial_images: int = 0
    progress: bool = False
    images: list = field(default_factory=list)  # decoded source images (PIL), set once the request is admitted
    sources: list = field(default_factory=list)  # their (width, height), from the uploads' headers
    cost: float = 0.0  # in default images (Limits.max_cost)
    text_tokens: int = 0
    image_tokens: int = 0  # source images' VQ tokens read by the AR
    output_tokens: int = 0  # grid tokens the AR writes per image

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def from_form(key: str, value):
    """A multipart field (always text) as the JSON value it stands for."""
    if not isinstance(value, str):
        return value
    if key in INTS:
        try:
            return int(value)
        except ValueError:
            return value  # refused below, with its name
    if key == "guidance_scale":
        try:
            return float(value)
        except ValueError:
            return value
    if key in BOOLS:
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    return value


def precheck(body: dict, kind: str) -> None:
    """What is refused whatever the values: unknown fields, and a mask (checked before any upload is decoded)."""
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(sorted(FIELDS[kind]))}",
                       unknown[0], "unknown_parameter")
    if body.get("mask") is not None:
        raise ApiError(400, "mask is not supported: GLM-Image edits the whole image from the prompt (no inpainting "
                       "mask); send the image and describe the change", "mask", "unsupported_parameter")


def parse(body: dict, kind: str, model, limits: Limits, sources: list | None = None) -> Spec:
    """Check a request's fields (JSON or multipart) against the API and the model; `model` is the served
    model (app.Served: id, card); `sources` the (width, height) of an edit's uploads (from their headers).
    Raises ApiError(400/404/422) naming the field and what is allowed."""
    precheck(body, kind)
    try:
        return _parse(body, kind, model, limits, sources or [])
    except InputError as e:
        raise ApiError(400, str(e), e.param, "invalid_value") from None


def _parse(body: dict, kind: str, model, limits: Limits, sources: list) -> Spec:
    card = model.card
    if "prompt" not in body:
        raise InputError("prompt is required", "prompt")
    prompt = check_prompt(body["prompt"], limits.max_prompt_chars)  # the CLI's and the Python API's rule
    if body.get("model") not in (None, "", model.id, "glm-image"):
        raise ApiError(404, f"model {body['model']!r} is not served here; GET /v1/models lists {model.id!r}", "model",
                       "model_not_found")
    n = check_int("n", body.get("n", 1) if body.get("n") is not None else 1, 1, limits.max_n)
    response_format = check_choice("response_format", body.get("response_format") or "b64_json", ("b64_json", "url"))
    output_format = check_choice("output_format", body.get("output_format") or "png", ("png", "jpeg", "webp"))
    compression = body.get("output_compression")
    if compression is not None:
        compression = check_int("output_compression", compression, 0, 100)
        if output_format == "png":
            raise InputError("output_compression applies to jpeg and webp only (png is lossless)", "output_compression")
    stream = _bool(body, "stream")
    partial_images = check_int("partial_images", body.get("partial_images") or 0, 0, 3)
    if partial_images and not stream:
        raise InputError("partial_images needs stream=true", "partial_images")
    for key, allowed in (("quality", ("auto",)), ("background", ("auto", "opaque")), ("moderation", ("auto", "low")),
                         ("input_fidelity", ("low", "high"))):
        if body.get(key) is not None and body[key] not in allowed:
            raise InputError(f"{key}={body[key]!r} is not supported by GLM-Image (allowed: {', '.join(allowed)}); "
                             + ("num_inference_steps sets the quality" if key == "quality" else ""), key)
    if body.get("style") is not None:
        raise InputError("style is a DALL-E 3 parameter; GLM-Image follows the prompt instead", "style")
    for key in ("user", "safety_identifier"):
        if body.get(key) is not None and (not isinstance(body[key], str) or len(body[key]) > 256):
            raise InputError(f"{key} must be a string of at most 256 characters", key)
    if kind == "edit":
        if not sources:
            raise InputError("an edit needs at least one source image (field image or image[])", "image")
        check_sources(sources, limits)
    defaults = card.defaults
    steps = body.get("num_inference_steps")
    steps = check_int("num_inference_steps", defaults.get("num_inference_steps", 50) if steps is None else steps, 1,
                      card.num_train_timesteps)
    guidance = body.get("guidance_scale")
    guidance = check_float("guidance_scale", defaults.get("guidance_scale", 1.5) if guidance is None else guidance, 0,
                           MAX_GUIDANCE)
    seed = body.get("seed")
    seed = check_seed(seed, n) if seed is not None else secrets.randbelow(2**32)
    height, width = _size(body.get("size"), card, sources)
    cfg = card.ar_cfg
    check_target_size(height, width, cfg, text_to_image=not sources)
    cost = request_cost(n, steps, height, width, card)
    if cost > limits.cost:
        dh, dw = card.default_size()
        raise ApiError(400, f"this request costs {cost:.3g} images at the model's defaults (n={n} x "
                       f"{steps}/{defaults.get('num_inference_steps', 50)} steps x {width}x{height} / {dw}x{dh} px); "
                       f"the server takes at most {limits.cost:g} per request: lower n, num_inference_steps or size",
                       None, "request_too_costly")
    grids = []
    for i, (w, h) in enumerate(sources):
        try:
            grids.append(_source_grid(w, h, cfg))
        except InputError as e:  # a readable image this model cannot use (too small, too elongated)
            raise ApiError(422, f"image {i}: {e}", "image", "unusable_image") from None
    batch = build_prompts([prompt], height, width, card.tokenizer, cfg, [grids] if grids else None)  # fits the context?
    image_tokens = sum(h * w for h, w in grids)
    generated = sum(h * w for h, w in batch.grids)
    return Spec(kind, prompt, n, height, width, steps, guidance, seed, response_format, output_format, compression,
                stream, partial_images, _bool(body, "progress_events"), [], list(sources), cost,
                int(batch.attention_mask.sum()) - image_tokens, image_tokens, generated)


def request_cost(n: int, steps: int, height: int, width: int, card) -> float:
    """Work in images at the model's default size and steps (the AR's tokens and the DiT's work per step grow
    with the pixels, the DiT's with the steps)."""
    dh, dw = card.default_size()
    return n * steps / card.defaults.get("num_inference_steps", 50) * height * width / (dh * dw)


def check_sources(sources: list, limits: Limits) -> None:
    """The uploads' count and pixels (each, and all together), from their headers: before anything is decoded."""
    if len(sources) > limits.max_images:
        raise InputError(f"{len(sources)} source images; at most {limits.max_images}", "image")
    total = sum(w * h for w, h in sources)
    if total > limits.max_source_pixels:
        sizes = ", ".join(f"{w}x{h}" for w, h in sources)
        raise InputError(f"the source images have {total / 1e6:.1f} Mpx together ({sizes}); this server decodes at "
                         f"most {limits.max_source_pixels / 1e6:.1f} Mpx per request: downscale them", "image")


def _bool(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{key}={value!r} must be true or false", key)
    return value


def _size(size, card, sources) -> tuple[int, int]:
    """(height, width) of "WIDTHxHEIGHT", or the model's default ("auto": an edit takes its first source's)."""
    if size in (None, "", "auto"):
        return card.default_size(sources[0] if sources else None)
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size) if isinstance(size, str) else None
    if not m:
        h, w = card.default_size()
        raise InputError(f"size={size!r} must be 'WIDTHxHEIGHT' (e.g. '{w}x{h}') or 'auto'", "size")
    return int(m.group(2)), int(m.group(1))


def _source_grid(width: int, height: int, cfg) -> tuple[int, int]:
    h, w = smart_resize(height, width, cfg.vision.patch_size, cfg.source_min_pixels, cfg.source_max_pixels,
                        cfg.max_aspect_ratio)
    return h // cfg.vision.patch_size, w // cfg.vision.patch_size


def probe_upload(data: bytes, name: str, limits: Limits) -> tuple[int, int]:
    """An upload's (width, height) from its header: PNG, JPEG or WebP, within the pixel limit; nothing decoded."""
    if len(data) == 0:
        raise InputError(f"{name} is empty", "image")
    w, h = image_size(data, name, FORMATS)
    if w * h > limits.max_pixels:
        raise InputError(f"{name} is {w}x{h}; at most {limits.max_pixels / 1e6:.0f} Mpx", "image")
    return w, h


def read_uploads(uploads: list[tuple[str, bytes]]) -> list:
    """Uploaded source images [(file name, bytes)], probed already -> RGB PIL images (InputError for truncated
    or broken files)."""
    return [load_image(data, f"image {i} ({name})", FORMATS) for i, (name, data) in enumerate(uploads)]


# -- answers

def encode(image, spec: Spec, params: dict) -> bytes:
    quality = spec.compression if spec.compression is not None else (90 if spec.output_format != "png" else None)
    return encode_image(image, spec.output_format.upper(), params, quality)


def image_object(data: bytes, spec: Spec, url: str | None) -> dict:
    return {"url": url} if spec.response_format == "url" else {"b64_json": base64.b64encode(data).decode()}


def images_response(objects: list[dict], spec: Spec) -> dict:
    return {"created": int(time.time()), "data": objects, "background": "opaque", "output_format": spec.output_format,
            "size": spec.size, "usage": usage(spec, len(objects))}


def usage(spec: Spec, n: int) -> dict:
    """The AR's real token counts: prompt text and source-image tokens read, grid tokens written."""
    inputs, outputs = spec.text_tokens + spec.image_tokens, spec.output_tokens * n
    return {"input_tokens": inputs, "output_tokens": outputs, "total_tokens": inputs + outputs,
            "input_tokens_details": {"text_tokens": spec.text_tokens, "image_tokens": spec.image_tokens}}


def stream_event(kind: str, data: bytes, spec: Spec, index: int, partial_index: int | None = None) -> str:
    """One Server-Sent Event as OpenAI writes image_generation.* / image_edit.* events."""
    prefix = "image_generation" if spec.kind == "generate" else "image_edit"
    event = {"type": f"{prefix}.{kind}", "b64_json": base64.b64encode(data).decode(), "created_at": int(time.time()),
             "size": spec.size, "quality": "auto", "background": "opaque", "output_format": spec.output_format,
             "image_index": index}
    if kind == "partial_image":
        event["partial_image_index"] = partial_index
    else:
        event["usage"] = usage(spec, 1)
    return sse(event["type"], event)


def sse(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"
