"""`glimage serve`: an OpenAI-compatible image server (FastAPI + uvicorn) with a web page.

    pip install "glimage[serve]" && glimage serve          # the shipped model on http://127.0.0.1:8000

engine.py schedules (admission, batching, the AR and DiT stages), api.py speaks the OpenAI Images API,
app.py is the HTTP app, metrics.py its Prometheus metrics, static/ the page.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ..validate import InputError, check_float, check_int


def api_keys(keys: list[str] | None, key_file: str | None) -> tuple[str, ...]:
    """--api-key (repeatable), --api-key-file (one per line, # comments) and $GLIMAGE_API_KEYS (comma-separated)."""
    found = list(keys or [])
    found += [k for k in os.environ.get("GLIMAGE_API_KEYS", "").split(",") if k.strip()]
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise InputError(f"--api-key-file {key_file!r}: no such file", "api_key_file")
        found += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    found = [k.strip() for k in found]
    short = [k for k in found if len(k) < 8]
    if short:
        raise InputError(f"API keys must have at least 8 characters ({len(short)} shorter given)", "api_key")
    return tuple(dict.fromkeys(found))


def main(args) -> int:
    import uvicorn

    from .api import Limits
    from .app import Settings, create_app, is_loopback

    check_int("--port", args.port, 0, 65535)
    check_int("--max-queue", args.max_queue, 1, 100000)
    check_int("--max-batch", args.max_batch, 1, 256)
    check_int("--max-n", args.max_n, 1, 64)
    check_float("--timeout", args.timeout, 1, 86400)
    check_float("--max-body-mb", args.max_body_mb, 0.01, 4096)
    keys = api_keys(args.api_key, args.api_key_file)
    if not keys and not is_loopback(args.host) and not args.allow_no_key:
        raise InputError(f"--host {args.host} is reachable from other machines and no API key is set: give "
                         "--api-key KEY (or $GLIMAGE_API_KEYS, --api-key-file), or --allow-no-key to serve openly",
                         "host")
    from ..cli import _model_spec
    _model_spec(args.model)  # a missing or broken folder fails here, before the server starts
    settings = Settings(model=args.model, api_keys=keys, max_queue=args.max_queue, max_batch=args.max_batch,
                        batch_wait=args.batch_wait_ms / 1000, device=args.dit_device or args.device,
                        ar_device=args.ar_device, dtype=args.dtype, offload=args.offload, threads=args.threads,
                        url_ttl=args.url_ttl, compile=args.compile,
                        fast={"step_cache": args.step_cache, "ar_int8": args.ar_int8}, cors_origins=tuple(args.cors_origin or ()),
                        limits=Limits(max_n=args.max_n, max_body_bytes=int(args.max_body_mb * 2**20),
                                      timeout=args.timeout))
    if settings.device:
        from ..device import resolve_device
        resolve_device(settings.device)
        if settings.ar_device:
            resolve_device(settings.ar_device)
    app = create_app(settings)
    # uvicorn drains on SIGTERM, then re-raises it under the handler found at start: a drained server exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    print(f"glimage serve: http://{args.host}:{args.port}/ (API /v1/images/generations, /v1/images/edits; "
          f"{'key required' if keys else 'no key'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout, access_log=args.log_level == "debug")
    return 0


def add_parser(sub) -> None:
    from ..cli import _device_args

    s = sub.add_parser("serve", help="an OpenAI-compatible image server with a web page",
                       description="Serve a model over the OpenAI Images API (POST /v1/images/generations, "
                       "/v1/images/edits), with a web page at / and Prometheus metrics at /metrics.")
    s.add_argument("model", nargs="?", default=None, help="model folder or random:PRESET (default: the shipped model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable); also $GLIMAGE_API_KEYS")
    s.add_argument("--api-key-file", default=None, help="file with one accepted key per line")
    s.add_argument("--allow-no-key", action="store_true", help="serve a non-loopback --host without any key")
    s.add_argument("--max-queue", type=int, default=16, help="requests admitted at once (waiting or running); more "
                   "are answered 429 with Retry-After (default 16)")
    s.add_argument("--max-batch", type=int, default=8, help="images per batch in each stage (default 8)")
    s.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a stage waits for a burst to fill its "
                   "batch (default 10)")
    s.add_argument("--max-n", type=int, default=8, help="largest n per request (default 8)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queue included "
                   "(504 after; default 600)")
    s.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body, uploads included (413 "
                   "above; default 25)")
    s.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a `url` answer stays valid (default 3600)")
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable; "
                   "default: none)")
    s.add_argument("--drain-timeout", type=int, default=60, help="on SIGTERM, seconds to let running requests "
                   "finish (default 60)")
    s.add_argument("--ar-device", default=None, help="device of the AR stage (default: --device)")
    s.add_argument("--dit-device", default=None, help="device of the DiT stage (default: --device)")
    _device_args(s)
    s.add_argument("--offload", action="store_true", help="keep weights on the CPU, move each stage to the GPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the AR decode step and the DiT blocks")
    from ..cli import _fast_args
    _fast_args(s)
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(fn=main)
