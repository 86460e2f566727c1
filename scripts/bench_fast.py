"""The opt-in fast modes against the exact path, side by side in one run, on a trained model (the shipped one by
default: on random weights any token change gives an unrelated image, so only a trained model says what a mode
costs): seconds per image, and what changes: the images' PSNR against the exact path's, and how many of the
fixed seeded `shapes` eval prompts the checker still passes.

    python scripts/bench_fast.py [--model FOLDER] [--n-per-category 4] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

MODES = {"exact": {}, "step-cache 0.1": {"step_cache": 0.1}, "step-cache 0.2": {"step_cache": 0.2},
         "step-cache 0.3": {"step_cache": 0.3}, "step-cache 0.5": {"step_cache": 0.5},
         "step-cache 1.0": {"step_cache": 1.0}, "AR int8": {"ar_int8": True},
         "step-cache 0.2 + AR int8": {"step_cache": 0.2, "ar_int8": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n-per-category", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from glimage.data.shapes import eval_prompts
    from glimage.eval.shapes import check
    from glimage.pipeline import GlmImagePipeline

    torch.set_num_threads(args.threads)
    specs = eval_prompts(seed=0, n_per_category=args.n_per_category)
    pipes = {}
    for name, kw in MODES.items():
        pipe = GlmImagePipeline.from_pretrained(args.model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_fast(**kw)
        pipe("warm up", seed=0)
        pipes[name] = pipe
    images = {name: [] for name in MODES}
    seconds = {name: 0.0 for name in MODES}
    for i, spec in enumerate(specs):  # the modes take turns per prompt: they see the same machine
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            images[name].append(pipe(spec["prompt"], seed=i).images[0])
            seconds[name] += time.perf_counter() - t0
    exact = [np.asarray(im, dtype=np.float64) / 255 for im in images["exact"]]
    rows = {}
    for name in MODES:
        arr = [np.asarray(im, dtype=np.float64) / 255 for im in images[name]]
        psnr = [10 * np.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-10)) for a, b in zip(arr, exact)]
        passed = sum(check(im, spec)[0] for im, spec in zip(images[name], specs))
        rows[name] = {"seconds_per_image": seconds[name] / len(specs), "psnr_db": float(np.median(psnr)),
                      "checker": f"{passed}/{len(specs)}"}
    base = rows["exact"]["seconds_per_image"]
    print(f"{len(specs)} eval prompts, {args.threads} thread(s), model {args.model or 'shipped'}")
    for name, r in rows.items():
        print(f"  {name:26s} {r['seconds_per_image']:.3f} s/image ({base / r['seconds_per_image']:.2f}x)  "
              f"PSNR vs exact {r['psnr_db']:.1f} dB (median)  checker {r['checker']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
