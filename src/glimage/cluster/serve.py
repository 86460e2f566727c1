"""The Ray Serve application: `glimage serve --ray [ADDRESS]`, or Ray's own tools with this builder:

    serve run glimage.cluster.serve:build model=/models/GLM-Image     # key=value args
    serve run examples/ray/serve.yaml                                  # a Serve config file (serve deploy too)

Three deployments; only prior ids, an edit's source images and finished images cross between them:
    ingress  the `glimage serve` FastAPI app (routes, OpenAI semantics, keys, limits, page, metrics) whose
             engine (engine.RayEngine) calls the other two
    ar       the AR half of the model; serve.batch groups concurrent images of one shape into one batch
    dit      the DiT half (glyph encoder, DiT, VAE); its replicas are the denoiser pool, one image at a time,
             streamed back as progress, partial images and the image

build(args) takes the application's arguments (ARGS below); each stage's Ray deployment options
(num_replicas, autoscaling_config, ray_actor_options with num_cpus/num_gpus/resources, ...) go under its name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from ..card import ModelCard, model_name
from ..serve import stages
from ..validate import InputError
from .engine import RayEngine
from .replica import ModelSpec

log = logging.getLogger("glimage.serve")
STAGES = ("ingress", "ar", "dit")
# the application's arguments and their defaults: the model, `glimage serve`'s limits, and the stages' options
ARGS = {"model": None, "device": None, "dtype": None, "threads": 1, "step_cache": None, "ar_int8": False,
        "api_keys": [], "max_queue": 16, "max_batch": 8, "batch_wait_ms": 10.0, "max_n": 8, "timeout": 600.0,
        "max_body_mb": 25.0, "max_cost": None, "max_source_mpx": None, "body_timeout": 60.0, "url_ttl": 3600.0,
        "public_url": None, "cors_origins": [], "retries": 2, "ar_workers": 2, "dit_workers": None,
        "ingress": {}, "ar": {}, "dit": {}}
# the args that `glimage serve` options set: arg -> the option's argparse dest
FROM_CLI = {**{k: k for k in ("model", "device", "dtype", "threads", "step_cache", "ar_int8", "max_queue", "max_batch",
                              "batch_wait_ms", "max_n", "timeout", "max_body_mb", "max_cost", "max_source_mpx",
                              "body_timeout", "url_ttl", "public_url")}, "cors_origins": "cors_origin"}
OPTIONS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests", "max_queued_requests",
           "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s")


@serve.deployment(name="ar", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class ARStage:
    def __init__(self, spec: ModelSpec, max_batch: int = 8, batch_wait_s: float = 0.01):
        self.pipe = spec.load("ar")
        self.draw.set_max_batch_size(max_batch)
        self.draw.set_batch_wait_timeout_s(batch_wait_s)

    def card(self) -> ModelCard:
        return ModelCard.of(self.pipe)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def draw(self, jobs: list[dict]) -> list[dict]:
        """Prior ids for each job; the jobs of one shape run as one batch, each row from its own seed."""
        return await asyncio.to_thread(self._draw, jobs)

    def _draw(self, jobs: list[dict]) -> list[dict]:
        groups: dict = {}
        items = [_item(job) for job in jobs]
        for i, it in enumerate(items):
            groups.setdefault(it.ar_key(), []).append(i)
        out = [None] * len(jobs)
        for idx in groups.values():
            batch = [items[i] for i in idx]
            try:
                stages.draw_priors(self.pipe, batch)
                for i, it in zip(idx, batch):
                    out[i] = {"prior": it.prior, "source_ids": it.source_ids, "source_grids": it.source_grids}
            except InputError as e:
                for i in idx:
                    out[i] = {"error": (400, str(e))}
            except Exception as e:  # noqa: BLE001 - one batch's bug answers its requests, the replica lives on
                log.exception("an AR batch failed")
                for i in idx:
                    out[i] = {"error": (500, f"internal error ({type(e).__name__}); see the AR replica's log")}
        return out


# max_ongoing_requests 2: one image denoising and the next one waiting here, ready the moment it ends. With 1,
# the next waits in the router, which polls full replicas with a backoff of up to 0.5 s: measured 33% slower.
@serve.deployment(name="dit", max_ongoing_requests=2, ray_actor_options={"num_cpus": 1})
class DiTStage:
    def __init__(self, spec: ModelSpec):
        self.pipe = spec.load("dit")
        self.busy = asyncio.Lock()  # one image at a time: its threads are the replica's cores

    async def __call__(self, job: dict):
        """Stream one image's events: progress, partial images, then the image (or an error)."""
        async with self.busy:
            async for ev in self._denoise(job):
                yield ev

    async def _denoise(self, job: dict):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        it = _item(job, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        req = it.req

        def fail(r, status, message, reason, code=None, retry_after=None):
            r.emit({"event": "error", "status": status, "message": message, "code": code or reason})
            r.cancel(reason)

        def work():
            try:
                stages.encode_glyphs(self.pipe, [it])
                stages.denoise(self.pipe, [it], fail, lambda item, image: req.emit({"event": "image", "image": image}))
            except InputError as e:
                fail(req, 400, str(e), "failed", "invalid_request")
            except Exception as e:  # noqa: BLE001
                log.exception("a DiT call failed")
                fail(req, 500, f"internal error ({type(e).__name__}); see the DiT replica's log", "failed", "internal")
            finally:
                req.emit({"event": "end"})

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while (ev := await events.get())["event"] != "end":
                yield ev
        finally:  # done, or the caller cancelled: the loop stops at its next step; one image at a time here
            req.cancel("disconnected")
            await asyncio.shield(task)


def _item(job: dict, sink=None) -> stages.Item:
    deadline = time.monotonic() + job["seconds_left"] if "seconds_left" in job else float("inf")
    req = stages.Request(job["prompt"], job["height"], job["width"], job["steps"], job["guidance"], job["seed"], 1,
                         list(job.get("images") or []), job.get("partial_images", 0), job.get("progress", False),
                         deadline, sink)
    it = stages.Item(req, job.get("index", 0), job["seed"])
    it.prior, it.source_ids, it.source_grids = job.get("prior"), job.get("source_ids"), job.get("source_grids")
    return it


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """`glimage serve`'s app; its engine calls the AR and DiT deployments."""

    def __init__(self, ar, dit, settings, model: str, workers: dict, retries: int):
        from ..serve import api_keys
        # keys from the replica's own environment ($GLIMAGE_API_KEYS: a Kubernetes secret, runtime_env) too
        settings.api_keys = tuple(dict.fromkeys(settings.api_keys + api_keys(None, None)))
        self.ar, self.dit, self.settings, self.model = ar, dit, settings, model
        self.workers, self.retries = workers, retries

    def __serve_build_asgi_app__(self):
        from ..serve.app import Served, create_app

        s = self.settings

        def start(metrics):
            card = self.ar.card.remote().result()  # waits for an AR replica: 503 "loading" meanwhile
            engine = RayEngine(self.ar, self.dit, s.max_queue, s.max_batch, s.batch_wait, metrics,
                               self.workers["ar"], self.workers["dit"], self.retries)
            return Served(model_name(self.model), None, engine.lanes, card), engine

        return create_app(s, start=start)


def build(args: dict):
    """The application from its arguments (ARGS; Ray passes a config file's `args`, or `serve run`'s
    key=value pairs as strings)."""
    from ..serve.api import Limits
    from ..serve.app import Settings
    from ..validate import MAX_SOURCE_PIXELS, check_float, check_int

    a = parse_args(args)
    spec = ModelSpec(a["model"], a["device"], a["dtype"], check_int("threads", int(a["threads"]), 1, 1024),
                     {"step_cache": a["step_cache"], "ar_int8": bool(a["ar_int8"])})
    max_n = check_int("max_n", int(a["max_n"]), 1, 64)
    source_px = MAX_SOURCE_PIXELS if a["max_source_mpx"] is None else float(a["max_source_mpx"]) * 1e6
    limits = Limits(max_n=max_n, max_body_bytes=int(check_float("max_body_mb", float(a["max_body_mb"]), 0.01, 4096)
                                                     * 2**20),
                    timeout=check_float("timeout", float(a["timeout"]), 1, 86400),
                    max_cost=None if a["max_cost"] is None else float(a["max_cost"]),
                    max_source_pixels=int(source_px))
    settings = Settings(model=a["model"], api_keys=tuple(a["api_keys"]),
                        max_queue=check_int("max_queue", int(a["max_queue"]), 1, 100000),
                        max_batch=check_int("max_batch", int(a["max_batch"]), 1, 256),
                        batch_wait=float(a["batch_wait_ms"]) / 1000, url_ttl=float(a["url_ttl"]),
                        public_url=a["public_url"], cors_origins=tuple(a["cors_origins"]),
                        body_timeout=float(a["body_timeout"]), limits=limits, fast=dict(spec.fast))
    workers = {"ar": check_int("ar_workers", int(a["ar_workers"]), 1, 256),
               "dit": None if a["dit_workers"] is None else check_int("dit_workers", int(a["dit_workers"]), 1, 4096)}
    ar = ARStage.options(**a["ar"]).bind(spec, settings.max_batch, settings.batch_wait)
    dit = DiTStage.options(**a["dit"]).bind(spec)
    return Ingress.options(**a["ingress"]).bind(ar, dit, settings, a["model"], workers,
                                                check_int("retries", int(a["retries"]), 0, 10))


def parse_args(args: dict | None) -> dict:
    """ARGS with `args` over them; an unknown name or stage option is refused, naming what is allowed."""
    import difflib

    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in ARGS.items()}
    for key, value in (args or {}).items():
        if key not in ARGS:
            near = difflib.get_close_matches(key, ARGS, 1)
            raise InputError(f"unknown argument {key!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                             f"; allowed: {', '.join(ARGS)}"), key)
        if key in STAGES:
            if not isinstance(value, dict) or set(value) - set(OPTIONS):
                bad = sorted(set(value) - set(OPTIONS)) if isinstance(value, dict) else value
                raise InputError(f"{key}: {bad!r} are not deployment options; allowed: {', '.join(OPTIONS)}", key)
        if key in ("api_keys", "cors_origins") and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if value in ("None", "null", ""):
            value = None
        out[key] = value
    if out["model"] is not None and not str(out["model"]).startswith("random:"):
        out["model"] = os.path.abspath(out["model"])  # replicas start elsewhere: never relative to their cwd
    return out


def config_args(path: str) -> dict:
    """The `args` of the glimage application in a Serve config file (the one `serve deploy` takes)."""
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--ray-config {path!r}: {getattr(e, 'strerror', None) or e}", "ray_config") from None
    apps = [a for a in cfg.get("applications", []) if str(a.get("import_path", "")).startswith("glimage.cluster")]
    if not apps:
        raise InputError(f"--ray-config {path!r}: no application with import_path glimage.cluster.serve:build",
                         "ray_config")
    return dict(apps[0].get("args") or {})


def main(args, keys: tuple[str, ...]) -> int:
    """`glimage serve --ray [ADDRESS]`: deploy the application on the cluster, serve until Ctrl-C/SIGTERM."""
    import signal
    import threading

    from . import connect

    a = config_args(args.ray_config) if args.ray_config else {}
    # the file's args hold unless an option was given (differs from its default)
    defaults = args.option_defaults
    a.update({arg: getattr(args, dest) for arg, dest in FROM_CLI.items() if getattr(args, dest) != defaults[dest]})
    if args.dit_device:
        a["device"] = args.dit_device
    if keys:
        a["api_keys"] = list(keys)
    app = build(a)  # bad arguments fail here, before anything starts
    connect(args.ray)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="glimage", route_prefix="/")
    print(f"glimage serve --ray: http://{args.host}:{args.port}/ (API /v1/images/generations, /v1/images/edits; "
          f"{'key required' if a.get('api_keys') else 'no key'}; stages: ingress, ar, dit)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.delete("glimage")
    return 0
