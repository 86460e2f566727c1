"""Thread counts under contention, side by side: seconds per image of the shipped model with torch's default
intra-op thread count, with 1 thread and with glimage's choice (`--threads auto`, the default of every
command), while 0, 1 or 2 other CPU-bound processes run (plain Python loops, or torch programs with their default
threads).

    python scripts/bench_threads.py [--images 2] [--hogs 0 1 2] [--json out.json]

Each (load, setting) is a fresh process (thread settings are fixed at start); the settings take turns within
a load so that they see the same machine. Prints a table and the thread count each setting used.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Other CPU-bound work: a pure-Python loop (one core), or another torch program with its default threads
# (OpenMP with every core: the kind of neighbour that makes two such programs stall each other).
HOGS = {"python": "while True: pass",
        "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a @ a"}


def child(mode: str, images: int) -> None:
    import torch

    from glimage.device import set_threads
    from glimage.pipeline import GlmImagePipeline

    if mode != "default":
        set_threads(1 if mode == "1" else "auto")
    pipe = GlmImagePipeline.from_pretrained(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", num_inference_steps=2, seed=0)  # warm-up
    times = []
    for i in range(images):
        t0 = time.perf_counter()
        pipe("a blue square at the top", seed=i)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"threads": torch.get_num_threads(), "times": times}))


def run(mode: str, images: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--images", str(images)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"threads": None, "times": None, "timeout": timeout}
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2], help="other CPU-bound processes")
    p.add_argument("--hog-kind", choices=sorted(HOGS), nargs="+", default=["python", "torch"])
    p.add_argument("--modes", nargs="+", default=["default", "1", "auto"])
    p.add_argument("--timeout", type=float, default=300, help="seconds per process before it counts as stalled")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.images)
    results = []
    loads = [(k, n) for n in args.hogs for k in (args.hog_kind if n else args.hog_kind[:1])]
    for kind, hogs in loads:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        procs = [subprocess.Popen([sys.executable, "-c", HOGS[kind]], env=env) for _ in range(hogs)]
        try:
            time.sleep(1.0)
            for mode in args.modes:
                r = run(mode, args.images, args.timeout)
                results.append({"hogs": hogs, "hog_kind": kind, "mode": mode, **r})
                per = (f"{min(r['times']):.2f}-{max(r['times']):.2f} s/image" if r["times"]
                       else f"> {args.timeout:.0f} s (stalled)")
                print(f"{hogs} busy {kind} process(es), threads={mode:7s} ({r['threads']} used): {per}", flush=True)
        finally:
            for q in procs:
                q.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
