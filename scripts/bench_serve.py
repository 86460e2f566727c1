"""Serving throughput, side by side in one run: C concurrent clients against `glimage serve` with batching and
stage pipelining (the defaults) and with `--max-batch 1`, plus the same images drawn one after another in one
process (what a server without batching or pipelining does). Also what batching changes: every image is
compared with the `--max-batch 1` one of the same prompt and seed (served alone, which equals the CLI's).

    python scripts/bench_serve.py [--clients 8] [--requests 48] [--model MODEL] [--steps N] [--size WxH]
                                  [--dtype D] [--json F]

On a GPU, e.g. `--model random:glm-image --size 512x512 --steps 20` (random weights built on the device).

With --ray: the Ray Serve application (`glimage serve --ray`, a local cluster) with 1 and with 2 DiT replicas
against `glimage serve --threads 1` (one DiT worker: the same compute as one replica), and every image compared
with glimage serve's. Each Ray replica runs one torch thread.

Loopback only; each server is a fresh process.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

PROMPTS = ["a red circle", "a blue square at the top", "a green square above a red circle",
           "a yellow triangle on the left", 'a sign that says "HI"', 'a sign that says "SHOP"',
           "a purple circle to the left of an orange square", "a blue triangle at the bottom"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(extra: list[str], model: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glimage.cli", "serve", *([model] if model else []), "--port", str(port),
           "--max-queue", "256", "--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            health = httpx.get(f"{url}/health", timeout=1)
            if health.status_code == 200 and health.json()["status"] == "ready":  # Ray: every replica up
                print(f"  server {' '.join(extra) or '(defaults)'}: {health.json()}", flush=True)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def jobs(n: int) -> list[tuple[str, int]]:
    return [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(n)]


def serve_run(url: str, work: list, clients: int, steps: int | None, size: str | None) -> tuple[float, list, dict]:
    def one(job):
        prompt, seed = job
        body = {"prompt": prompt, "seed": seed, **({"num_inference_steps": steps} if steps else {}),
                **({"size": size} if size else {})}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
        r.raise_for_status()
        data = base64.b64decode(r.json()["data"][0]["b64_json"])
        return time.perf_counter() - t0, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    one(("warm up", 1))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, work))
    wall = time.perf_counter() - t0
    return wall, [lat for lat, _ in results], {job: img for job, (_, img) in zip(work, results)}


def sequential_run(work: list, model: str | None, steps: int | None, size: tuple | None, dtype=None) -> float:
    """The same images one after another in one process (torch's threads as `glimage generate` picks them)."""
    from glimage.device import set_threads
    from glimage.pipeline import GlmImagePipeline
    set_threads("auto")
    if model and model.startswith("random:"):
        pipe = GlmImagePipeline.from_config(model[len("random:"):], seed=0, dtype=dtype)
    else:
        pipe = GlmImagePipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe("warm up", seed=1, num_inference_steps=steps, height=size[0] if size else None,
         width=size[1] if size else None)
    t0 = time.perf_counter()
    for prompt, seed in work:
        pipe(prompt, seed=seed, num_inference_steps=steps, height=size[0] if size else None,
             width=size[1] if size else None)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--model", default=None, help="model folder or random:PRESET (default: the shipped model)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: the server's auto)")
    p.add_argument("--ray", action="store_true", help="the Ray app with 1 and 2 DiT replicas vs glimage serve")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = jobs(args.requests)
    rows, images = {}, {}
    runs = (("batched + pipelined (defaults)", []), ("--max-batch 1", ["--max-batch", "1"]))
    if args.ray:
        runs = (("glimage serve --threads 1", ["--threads", "1"]), ("ray, 1 DiT replica", ray_args(1)),
                ("ray, 2 DiT replicas", ray_args(2)))
    for name, extra in runs:
        proc, url = start(extra + (["--dtype", args.dtype] if args.dtype else []), args.model)
        try:
            wall, lat, images[name] = serve_run(url, work, args.clients, args.steps, args.size)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        rows[name] = {"images_per_s": len(work) / wall, "p50_s": float(np.percentile(lat, 50)),
                      "p95_s": float(np.percentile(lat, 95))}
    if args.ray:
        return report_ray(args, work, rows, images)
    hw = tuple(int(v) for v in reversed(args.size.split("x"))) if args.size else None
    wall = sequential_run(work, args.model, args.steps, hw, args.dtype)
    rows["one after another, one process"] = {"images_per_s": len(work) / wall}
    alone, batched = images["--max-batch 1"], images["batched + pipelined (defaults)"]
    diffs = [int(np.abs(alone[j].astype(int) - batched[j].astype(int)).max()) for j in work]
    base = rows["--max-batch 1"]["images_per_s"]
    print(f"{args.clients} clients, {len(work)} images of {args.model or 'the shipped model'}")
    for name, r in rows.items():
        lat = f", p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s" if "p50_s" in r else ""
        print(f"  {name:32s} {r['images_per_s']:.2f} images/s ({r['images_per_s'] / base:.2f}x --max-batch 1){lat}")
    print(f"  batched vs alone: {sum(d == 0 for d in diffs)}/{len(diffs)} images identical, largest pixel "
          f"difference {max(diffs)}/255")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clients": args.clients, "requests": len(work), "rows": rows, "pixel_diffs": diffs}, f,
                      indent=2)


def ray_args(dit_replicas: int) -> list[str]:
    """`glimage serve --ray` on a local cluster: ingress, one AR replica, `dit_replicas` DiT replicas."""
    import tempfile
    cfg = {"applications": [{"name": "glimage", "import_path": "glimage.cluster.serve:build", "route_prefix": "/",
                             "args": {"ar": {"ray_actor_options": {"num_cpus": 0.5}},
                                      "dit": {"num_replicas": dit_replicas, "ray_actor_options": {"num_cpus": 0.75}}}}]}
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    json.dump(cfg, f)  # JSON is YAML
    f.close()
    return ["--ray", "--ray-config", f.name]


def report_ray(args, work, rows: dict, images: dict) -> None:
    base_name = "glimage serve --threads 1"
    base = rows[base_name]["images_per_s"]
    print(f"{args.clients} clients, {len(work)} images of {args.model or 'the shipped model'}")
    for name, r in rows.items():
        same = sum(np.array_equal(images[name][j], images[base_name][j]) for j in work)
        diff = max(int(np.abs(images[name][j].astype(int) - images[base_name][j].astype(int)).max()) for j in work)
        print(f"  {name:28s} {r['images_per_s']:.2f} images/s ({r['images_per_s'] / base:.2f}x glimage serve), "
              f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s; {same}/{len(work)} images identical to glimage "
              f"serve's (which batches the DiT), largest difference {diff}/255")
    two, one = rows["ray, 2 DiT replicas"]["images_per_s"], rows["ray, 1 DiT replica"]["images_per_s"]
    print(f"  2 DiT replicas / 1: {two / one:.2f}x; Ray overhead at 1 replica: {(1 - one / base) * 100:.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clients": args.clients, "requests": len(work), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
