"""`glimage serve`: the OpenAI Images API, a web page and Prometheus metrics over one loaded model.

Routes: POST /v1/images/generations (JSON), POST /v1/images/edits (multipart), GET /v1/models,
GET /v1/images/files/{id} (the `url` answers: unguessable, expiring), GET /health, GET /metrics, GET / (page).
Every error is OpenAI's body {"error": {"message", "type", "param", "code"}} with the fitting status, so the
official client raises its matching exception; a bad request is never a 500. A request's cost is bounded
before its work starts (api.parse: sizes, cost, the uploads' headers), an edit's images are decoded only once
it is admitted, and deadlines hold in every stage (engine.py); guard.py is what every request goes through,
connections.py what every connection does.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..card import ModelCard, model_name
from ..validate import InputError
from . import api
from .api import ApiError, Limits, Spec
from .engine import Busy, Engine, Unavailable
from .engine import Request as Job
from .forms import Part, read_form
from .guard import Guard
from .metrics import Metrics

log = logging.getLogger("glimage.serve")
STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere: scripts and styles from this server only, images also as data:/blob:.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class Settings:
    model: str | None = None  # folder, random:PRESET, or None = the shipped model
    api_keys: tuple[str, ...] = ()
    max_queue: int = 16
    max_batch: int = 8
    batch_wait: float = 0.01
    device: str | None = None  # the DiT's (and glyph encoder's and VAE's)
    ar_device: str | None = None
    dtype: str | None = None
    offload: bool = False
    compile: bool = False
    fast: dict = field(default_factory=dict)  # opt-in fast modes: GlmImagePipeline.enable_fast's arguments
    threads: int | str = "auto"
    url_ttl: float = 3600.0
    url_cache_bytes: int = 512 * 2**20
    public_url: str | None = None  # base of `url` answers (behind a proxy); None: this request's own address
    cors_origins: tuple[str, ...] = ()
    body_timeout: float = 60.0  # seconds for a request's body to arrive once its headers have
    limits: Limits = field(default_factory=Limits)


@dataclass
class Served:
    id: str
    pipe: object = None  # GlmImagePipeline; None where the stages run elsewhere (glimage.cluster)
    lanes: int = 1  # DiT shards run at once (CPU cores), see Engine
    card: ModelCard | None = None  # what requests are checked against; default: the pipeline's

    def __post_init__(self):
        if self.card is None:
            self.card = ModelCard.of(self.pipe)


class UrlStore:
    """Images answered as `url`: kept in memory under an unguessable id until they expire (or the byte budget
    pushes out the oldest)."""

    def __init__(self, ttl: float, budget: int):
        self.ttl, self.budget, self.items, self.size = ttl, budget, OrderedDict(), 0
        self.lock = threading.Lock()

    def put(self, data: bytes, media: str) -> str:
        token = secrets.token_urlsafe(24)
        with self.lock:
            self.items[token] = (data, media, time.monotonic() + self.ttl)
            self.size += len(data)
            while self.size > self.budget and self.items:
                _, (old, _, _) = self.items.popitem(last=False)
                self.size -= len(old)
        return token

    def get(self, token: str):
        with self.lock:
            item = self.items.get(token)
            if item is None or item[2] < time.monotonic():
                if item is not None:
                    del self.items[token]
                    self.size -= len(item[0])
                return None
            return item[0], item[1]


def load_model(settings: Settings) -> Served:
    """The pipeline on its devices, with thread counts that hold up with both stages busy on one CPU."""
    import torch

    from ..device import resolve_device, set_threads
    from ..pipeline import open_model

    threads = set_threads(settings.threads)
    m = settings.model
    pipe = open_model(m, settings.device, settings.dtype, offload=settings.offload, ar_device=settings.ar_device)
    name = model_name(m)
    pipe.set_progress_bar_config(disable=True)
    if settings.compile:
        pipe.enable_compile()
    pipe.enable_fast(**settings.fast)
    ar_dev = resolve_device(settings.ar_device) if settings.ar_device else pipe.device
    lanes = 1
    if pipe.device.type == "cpu" and ar_dev.type == "cpu":
        # Both stages on the CPU, busy at once: every worker runs single-threaded (OpenMP threads of one op
        # stall whenever another worker takes one of their cores: ~2.5x slower measured, see
        # scripts/bench_threads.py), and one DiT worker per core (`--threads N`: N) takes the batches instead.
        # Single-threaded workers only share a busy core, they never stall on it: no idle-core snapshot here.
        torch.set_num_threads(1)
        lanes = threads if settings.threads != "auto" else len(os.sched_getaffinity(0)) \
            if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    log.info("model %s on %s; %d DiT lane(s), %d torch thread(s) each", name, pipe.device, lanes,
             torch.get_num_threads())
    return Served(name, pipe, lanes)


def local_engine(settings: Settings, metrics, served: Served | None = None) -> tuple[Served, Engine]:
    """The model loaded in this process (or `served`), and the engine that runs its stages in threads here."""
    s = served or load_model(settings)
    return s, Engine(s.pipe, settings.max_queue, settings.max_batch, settings.batch_wait, metrics, s.lanes)


def create_app(settings: Settings, served: Served | None = None, start=None) -> FastAPI:
    """The app. start(metrics) -> (Served, engine) runs in the background at startup (503 meanwhile): by
    default it loads the model here; glimage.cluster's ingress passes one whose engine calls Ray deployments.
    `served` given = that model, ready at once (tests)."""
    metrics = Metrics()
    urls = UrlStore(settings.url_ttl, settings.url_cache_bytes)
    status = {"state": "loading", "error": None}
    holder: dict = {}
    start = start or (lambda m: local_engine(settings, m))

    def ready(s: Served, engine) -> None:
        engine.start()
        holder.update(served=s, engine=engine)
        status["state"] = "ready"

    def load() -> None:
        try:
            ready(*start(metrics))
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            log.exception("loading the model failed")
            status.update(state="failed", error=str(e))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if served is not None:
            ready(*local_engine(settings, metrics, served))
        else:
            threading.Thread(target=load, name="glimage-load", daemon=True).start()
        yield
        engine = holder.get("engine")
        if engine is not None:
            status["state"] = "draining"
            await asyncio.to_thread(engine.drain, 0.0)  # uvicorn already waited for in-flight requests
            engine.stop()

    app = FastAPI(title="glimage", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics, app.state.status, app.state.holder = metrics, status, holder
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, max_body=settings.limits.max_body_bytes, body_timeout=settings.body_timeout,
                       metrics=metrics)
    decoding = asyncio.Semaphore(1)  # source images decode one request at a time: memory stays that of one

    def error(e: ApiError) -> Response:
        metrics.reject({400: "bad_request", 401: "unauthorized", 404: "not_found", 408: "body_timeout",
                        413: "too_large", 415: "unsupported_media_type", 422: "unusable_image", 429: "queue_full",
                        503: "unavailable", 504: "timeout"}.get(e.status, "error"))
        return Response(json.dumps(e.body(), ensure_ascii=True), e.status, headers=e.headers,
                        media_type="application/json")

    app.add_exception_handler(ApiError, lambda request, e: error(e))
    app.add_exception_handler(HTTPException, lambda request, e: error(ApiError(
        e.status_code, {404: f"no route {request.url.path[:200]}", 405: f"{request.method} is not allowed on "
                        f"{request.url.path[:200]}"}.get(e.status_code, str(e.detail)), code="not_found")))

    def authorize(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # every key compared, in constant time: neither which key nor how much of it matched leaks
        if not given or not any([hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys]):
            raise ApiError(401, "missing or incorrect API key: send Authorization: Bearer KEY", None,
                           "invalid_api_key")

    def engine_or_503() -> tuple[Served, Engine]:
        if status["state"] != "ready":
            why = status["error"] or f"the server is {status['state']}"
            raise ApiError(503, why, None, status["state"], "server_error", {"Retry-After": "5"})
        return holder["served"], holder["engine"]

    # -- the page and the small routes

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        kinds = {"app.js": "text/javascript", "app.css": "text/css"}
        if name not in kinds:
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response((STATIC / name).read_bytes(), media_type=f"{kinds[name]}; charset=utf-8",
                        headers={"Content-Security-Policy": CSP})

    @app.get("/health")
    async def health():
        body = {"status": status["state"], "version": __version__}
        if status["state"] == "ready":
            engine = holder["engine"]
            waiting, admitted = engine.queue_depth()
            body.update(model=holder["served"].id, waiting_images=waiting, requests=admitted)
            body.update(await asyncio.to_thread(engine.health))
            if body["status"] == "unavailable":  # a stage has no replica left: load balancers look elsewhere
                return JSONResponse(body, 503, headers={"Retry-After": "5"})
            return body
        body["error"] = status["error"]
        return JSONResponse(body, 503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics_route(request: Request):
        authorize(request)
        body = await asyncio.to_thread(metrics.render)  # off the event loop: a scrape never stalls serving
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        s, _ = engine_or_503()
        return {"object": "list", "data": [model_object(s)]}

    @app.get("/v1/images/files/{name}")
    async def files(name: str):
        item = urls.get(name.split(".")[0])
        if item is None:
            raise ApiError(404, "no such image: the URL is wrong or has expired", None, "not_found")
        return Response(item[0], media_type=item[1], headers={"Cache-Control": "private, max-age=3600"})

    # -- the images API

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        s, engine = engine_or_503()
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, "send the request as application/json", None, "unsupported_media_type")
        body = await asyncio.to_thread(read_json, await request.body())
        spec = await asyncio.to_thread(api.parse, body, "generate", s, settings.limits)
        job, events = new_job(spec)
        admit(job, engine)
        return await run(request, spec, job, events, s, engine)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        authorize(request)
        s, engine = engine_or_503()
        if request.headers.get("content-type", "").split(";")[0].strip() != "multipart/form-data":
            raise ApiError(415, "send an edit as multipart/form-data (image or image[] files, prompt, ...)", None,
                           "unsupported_media_type")
        lim = settings.limits
        body, uploads = {}, []
        for key, value in await read_form(request, max_fields=64, max_files=lim.max_images + 2):
            if isinstance(value, Part):  # an uploaded file
                if key in ("image", "image[]"):
                    uploads.append((value.filename or key, bytes(value.data)))
                    continue
                value = "<file>"
            elif key in ("image", "image[]"):
                raise ApiError(400, f"{key} must be an uploaded image file, not a text field", key, "invalid_value")
            if key in body:
                raise ApiError(400, f"field {key!r} is given twice", key, "invalid_value")
            body[key] = api.from_form(key, value)
        api.precheck(body, "edit")
        if len(uploads) > lim.max_images:
            raise ApiError(400, f"{len(uploads)} source images; at most {lim.max_images}", "image", "invalid_value")
        try:  # formats and pixels from the headers: nothing is decoded before the request is admitted
            sizes = [api.probe_upload(data, f"image {i} ({name})", lim) for i, (name, data) in enumerate(uploads)]
        except InputError as e:
            raise ApiError(400, str(e), "image", "invalid_image") from None
        spec = await asyncio.to_thread(api.parse, body, "edit", s, lim, sizes)
        job, events = new_job(spec)
        admit(job, engine)
        try:
            async with decoding:
                images = await asyncio.to_thread(api.read_uploads, uploads)
        except InputError as e:
            engine.cancel(job, "failed")
            raise ApiError(400, str(e), "image", "invalid_image") from None
        except BaseException:
            engine.cancel(job, "failed")
            raise
        job.images = images
        del uploads, images  # the job holds the images, and nothing holds them once it is answered
        return await run(request, spec, job, events, s, engine)

    def new_job(spec: Spec) -> tuple[Job, asyncio.Queue]:
        """The engine's request, and the queue its events arrive in (from the engine's threads), from the moment
        it is admitted: an error while it is still being prepared (a drain) reaches the client too."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(spec.prompt, spec.height, spec.width, spec.steps, spec.guidance, spec.seed, spec.n, [],
                  spec.partial_images, spec.progress, time.monotonic() + settings.limits.timeout,
                  lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return job, events

    def admit(job: Job, engine: Engine) -> None:
        try:
            engine.reserve(job)
        except Busy as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded", "requests",
                           {"Retry-After": str(e.retry_after)}) from None
        except Unavailable as e:
            raise ApiError(503, str(e), None, "unavailable", "server_error", {"Retry-After": "5"}) from None

    def base_url(request: Request) -> str:
        return settings.public_url.rstrip("/") + "/" if settings.public_url else str(request.base_url)

    async def run(request: Request, spec: Spec, job: Job, events: asyncio.Queue, s: Served, engine: Engine):
        engine.enqueue(job)
        request.scope["glimage.trim"] = True  # Guard: give freed pages back once the answer is sent

        def params(seed: int) -> dict:
            return {"prompt": spec.prompt, "seed": seed, "height": spec.height, "width": spec.width,
                    "num_inference_steps": spec.steps, "guidance_scale": spec.guidance, "model": s.id,
                    "glimage": __version__, **s.card.fast}

        async def encoded(ev: dict) -> bytes:
            return await asyncio.to_thread(api.encode, ev["image"], spec, params(spec.seed + ev["index"]))

        if spec.stream:
            return StreamingResponse(stream(job, events, spec, encoded, engine), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, dict] = {}
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(job, "disconnected")
                        metrics.reject("disconnected")
                        return Response(status_code=499)
                    continue
                if ev["event"] == "image":
                    data = await encoded(ev)
                    url = None
                    if spec.response_format == "url":
                        url = f"{base_url(request)}v1/images/files/{urls.put(data, MEDIA[spec.output_format])}." \
                              f"{spec.output_format}"
                    results[ev["index"]] = api.image_object(data, spec, url)
                elif ev["event"] == "error":
                    retry = ev.get("retry_after")
                    raise ApiError(ev["status"], ev["message"], None, ev.get("code"),
                                   "server_error" if ev["status"] >= 500 else "invalid_request_error",
                                   {"Retry-After": str(retry)} if retry else None)
                elif ev["event"] == "done":
                    return api.images_response([results[i] for i in sorted(results)], spec)
        except asyncio.CancelledError:  # the server stops waiting (shutdown): the engine stops too
            engine.cancel(job, "shutdown")
            raise

    return app


async def stream(job: Job, events: asyncio.Queue, spec: Spec, encoded, engine: Engine):
    finished = False
    try:
        while True:
            ev = await events.get()
            kind = ev["event"]
            if kind == "partial":
                yield api.stream_event("partial_image", await encoded(ev), spec, ev["index"], ev["partial_index"])
            elif kind == "image":
                yield api.stream_event("completed", await encoded(ev), spec, ev["index"])
            elif kind == "progress":
                yield api.sse("glimage.progress", {"type": "glimage.progress", "image_index": ev["index"],
                                                   "step": ev["step"], "steps": ev["steps"]})
            elif kind == "error":
                finished = True
                kind = "server_error" if ev["status"] >= 500 else "invalid_request_error"
                yield api.sse("error", {"type": "error", "error": {"message": ev["message"], "type": kind,
                                                                   "param": None, "code": ev.get("code")}})
                return
            elif kind == "done":
                finished = True
                return
    finally:
        if not finished:  # the client went away (or the server stops): stop the work at the next step
            engine.cancel(job, "disconnected")


def model_object(s: Served) -> dict:
    card = s.card
    h, w = card.default_size()
    lo, hi = card.ar_cfg.size_range
    d = card.defaults
    return {"id": s.id, "object": "model", "created": 0, "owned_by": "glimage",
            "glimage": {"default_size": f"{w}x{h}", "num_inference_steps": d.get("num_inference_steps", 50),
                        "guidance_scale": d.get("guidance_scale", 1.5), "size_step": card.ar_cfg.grid_factor,
                        "min_side": lo, "max_side": hi}}


def read_json(raw: bytes) -> dict:
    """A request body as a JSON object; anything else (nested past the recursion limit, a number past
    Python's 4300 digits, invalid UTF-8) is a 400, never a 500."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else \
            "a number has more than 4300 digits" if "digits" in str(e) else str(e)[:200]
        raise ApiError(400, f"the body is not valid JSON: {why}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return body


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
