"""glimage on a Ray cluster (pip install "glimage[ray]"): the AR and the DiT as separately scaled pools.

    serve.py   online: a Ray Serve application (ingress = the `glimage serve` FastAPI app, an AR deployment,
               a DiT deployment whose replicas are the denoiser pool); `glimage serve --ray`, `serve run`
    engine.py  the ingress' engine: glimage.serve's admission, fairness and deadlines, its stages calls to the
               deployments (retried on another replica when one dies)
    data.py    offline: `glimage generate --prompts FILE.jsonl --out DIR --ray` on Ray Data
    replica.py what a replica loads (its half of the model) and how it pins its threads

Only this package imports ray; only prior ids, an edit's source images and the finished images cross between
processes, never latents.
"""

from __future__ import annotations

from ..validate import InputError


def require_ray():
    """The ray module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install \"glimage[ray]\" (ray[serve,data])", "ray") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address` ("auto": the one `ray start` made here), or start a local one."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    import logging
    import os

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the CLI draws its own progress bar
    from ray.data import DataContext
    DataContext.get_current().enable_progress_bars = False
    if address in (None, "local"):
        # Serve's controller runs its loop every 0.1 s by default: 12% of a 2-core machine, measured, which its
        # replicas then lack (2 DiT replicas / 1: 1.41x; 1.80x at 1 s). Images take seconds: 1 s reacts in time.
        os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "1")
        # workers inherit this process' environment: one torch thread each unless told otherwise
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
    else:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise InputError(f"--ray {address!r}: no Ray cluster there ({e}); start one with `ray start --head`",
                             "ray") from None
    return ray
