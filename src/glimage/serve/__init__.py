"""`glimage serve`: an OpenAI-compatible image server (FastAPI + uvicorn) with a web page.

    pip install "glimage[serve]" && glimage serve          # the shipped model on http://127.0.0.1:8000

engine.py schedules (admission, batching, the AR and DiT stages), api.py speaks the OpenAI Images API,
app.py is the HTTP app, metrics.py its Prometheus metrics, static/ the page; stages.py what the AR and DiT
stages compute (also in glimage.cluster's Ray deployments: `glimage serve --ray`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ..validate import MAX_SOURCE_PIXELS, InputError, check_float, check_int


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


def check_args(args) -> tuple[str, ...]:
    """Every `glimage serve` option that needs no model, checked before anything starts; returns the API keys.
    Shared by the local server (main) and the Ray application (glimage.cluster.serve.main)."""
    from .app import is_loopback

    check_int("--port", args.port, 0, 65535)
    check_int("--max-queue", args.max_queue, 1, 100000)
    check_int("--max-batch", args.max_batch, 1, 256)
    check_int("--max-n", args.max_n, 1, 64)
    check_float("--timeout", args.timeout, 1, 86400)
    check_float("--max-body-mb", args.max_body_mb, 0.01, 4096)
    check_float("--header-timeout", args.header_timeout, 0.5, 3600)
    check_float("--body-timeout", args.body_timeout, 0.5, 3600)
    check_int("--max-connections", args.max_connections, 8, 10**6)
    if args.max_cost is not None:
        check_float("--max-cost", args.max_cost, 0, 10**6, lo_open=True)
    check_float("--max-source-mpx", args.max_source_mpx, 0.001, 4096)
    if args.public_url is not None and not args.public_url.startswith(("http://", "https://")):
        raise InputError(f"--public-url {args.public_url!r} must start with http:// or https://", "public_url")
    keys = api_keys(args.api_key, args.api_key_file)
    if not keys and not is_loopback(args.host) and not args.allow_no_key:
        raise InputError(f"--host {args.host} is reachable from other machines and no API key is set: give "
                         "--api-key KEY (or $GLIMAGE_API_KEYS, --api-key-file), or --allow-no-key to serve openly",
                         "host")
    from ..cliargs import model_spec
    model_spec(args.model)  # a missing or broken folder fails here, before the server starts
    return keys


def main(args) -> int:
    """The server in this process (`glimage serve` without --ray)."""
    import logging

    import uvicorn

    from .api import Limits
    from .app import Settings, create_app
    from .connections import AcceptErrors, connection_limit, guarded_protocol, raise_fd_limit

    keys = check_args(args)
    if args.ray_config is not None:
        raise InputError("--ray-config goes with --ray", "ray_config")
    settings = Settings(model=args.model, api_keys=keys, max_queue=args.max_queue, max_batch=args.max_batch,
                        batch_wait=args.batch_wait_ms / 1000, device=args.dit_device or args.device,
                        ar_device=args.ar_device, dtype=args.dtype, offload=args.offload, threads=args.threads,
                        url_ttl=args.url_ttl, compile=args.compile, public_url=args.public_url,
                        fast={"step_cache": args.step_cache, "ar_int8": args.ar_int8},
                        cors_origins=tuple(args.cors_origin or ()), body_timeout=args.body_timeout,
                        limits=Limits(max_n=args.max_n, max_body_bytes=int(args.max_body_mb * 2**20),
                                      timeout=args.timeout, max_cost=args.max_cost,
                                      max_source_pixels=int(args.max_source_mpx * 1e6)))
    if settings.device:
        from ..device import resolve_device
        resolve_device(settings.device)
        if settings.ar_device:
            resolve_device(settings.ar_device)
    sock = listen(args.host, args.port)  # a port in use fails here, before the banner
    fds = raise_fd_limit()
    conns = connection_limit(args.max_connections, fds)
    app = create_app(settings)
    logging.getLogger("asyncio").addFilter(AcceptErrors())
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            access_log=args.log_level == "debug",
                            http=guarded_protocol(conns, args.header_timeout))
    # uvicorn drains on SIGTERM, then re-raises it under the handler found at start: a drained server exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    print(f"glimage serve: http://{args.host}:{port}/ (API /v1/images/generations, /v1/images/edits; "
          f"{'key required' if keys else 'no key'}; at most {conns} connections)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A listening socket on host:port, or an InputError saying why not (a port in use, an unknown host)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e} (--host/--port)", "port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def add_parser(sub, parents=()) -> None:
    from ..cliargs import device_args

    s = sub.add_parser("serve", help="an OpenAI-compatible image server with a web page", parents=list(parents),
                       description="Serve a model over the OpenAI Images API (POST /v1/images/generations, "
                       "/v1/images/edits), with a web page at / and Prometheus metrics at /metrics.")
    s.add_argument("model", nargs="?", default=None, help="model folder or random:PRESET (default: the shipped model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", help="accepted Bearer key, at least 8 characters (repeatable); "
                   "also $GLIMAGE_API_KEYS")
    s.add_argument("--api-key-file", default=None, help="file with one accepted key (8+ characters) per line")
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
    s.add_argument("--max-cost", type=float, default=None, help="largest request, in images at the model's default "
                   "size and steps: n x steps/default x pixels/default (400 above; default: --max-n)")
    s.add_argument("--max-source-mpx", type=float, default=MAX_SOURCE_PIXELS / 1e6, help="megapixels of an edit's "
                   "source images together, read from their headers before decoding (400 above; default "
                   f"{MAX_SOURCE_PIXELS / 1e6:.1f}: one 8192x8192)")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection has to send a request's "
                   "headers (408 and closed after; default 10)")
    s.add_argument("--body-timeout", type=float, default=60.0, help="seconds a request's body has to arrive after "
                   "its headers (408 after; default 60)")
    s.add_argument("--max-connections", type=int, default=1000, help="open connections at most, kept below the "
                   "descriptor limit (raised to its hard limit at start); beyond it the longest wait for headers is "
                   "closed (default 1000)")
    s.add_argument("--public-url", default=None, help="base URL of `url` answers, e.g. https://images.example.com "
                   "behind a reverse proxy (default: the address the request came to)")
    s.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a `url` answer stays valid (default 3600)")
    s.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable; "
                   "default: none)")
    s.add_argument("--drain-timeout", type=int, default=60, help="on SIGTERM, seconds to let running requests "
                   "finish (default 60)")
    s.add_argument("--ar-device", default=None, help="device of the AR stage (default: --device)")
    s.add_argument("--dit-device", default=None, help="device of the DiT stage (default: --device)")
    device_args(s)
    s.add_argument("--offload", action="store_true", help="keep weights on the CPU, move each stage to the GPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the AR decode step and the DiT blocks")
    from ..cliargs import fast_args
    fast_args(s)
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="serve as a Ray Serve "
                   "application, the AR and the DiT as separately scaled deployments (pip install \"glimage[ray]\"); "
                   "ADDRESS of a running cluster (e.g. auto), else a local one")
    s.add_argument("--ray-config", default=None, metavar="FILE.yaml", help="with --ray: a Serve config file "
                   "(examples/ray/serve.yaml): replicas, resources and autoscaling of each stage; the options given "
                   "here override its args")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    # --ray-config's args hold unless an option is given: the Ray front end tells given from default by these
    s.set_defaults(fn=main, option_defaults={a.dest: a.default for a in s._actions})
    return s
