"""The MindSpore backend's speed beside the PyTorch path's on this machine, in one process, runs interleaved.

    python scripts/bench_mindspore.py [--threads 1] [--images 3] [--steps 5]

Generation: the shipped model (128x128, 20 steps, CFG), seconds per image and per stage, for torch, MindSpore
(PyNative) and MindSpore with enable_compile (AR decode step and DiT in graph mode; compiled in the warm-up:
~2 s each, not counted).
Training: one optimizer step (forward, backward, AdamW) of the tiny-ar and tiny-decoder recipes on the same
batch of 8. Both frameworks get the same number of CPU threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def bench_generation(n_images: int) -> dict:
    from glimage.mindspore.pipeline import MindSporePipeline
    from glimage.pipeline import GlmImagePipeline
    from glimage.timing import Timer

    pipes = {"torch": GlmImagePipeline.from_pretrained(None), "mindspore": MindSporePipeline.from_pretrained(None),
             "mindspore+compile": MindSporePipeline.from_pretrained(None)}
    pipes["mindspore+compile"].enable_compile()
    prompts = ["a red circle", 'a sign that says "HI"', "two blue squares"]
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        for prompt in prompts:  # warm-up, and graph compilation for each glyph length
            p(prompt, seed=99)
    times = {k: [] for k in pipes}
    stages = {k: Timer() for k in pipes}
    for i in range(n_images):
        for name, p in pipes.items():
            t0 = time.perf_counter()
            p(prompts[i % len(prompts)], seed=i, timer=stages[name])
            times[name].append(time.perf_counter() - t0)
    return {name: {"s_per_image": statistics.median(t),
                   **{k: v / n_images for k, v in stages[name].times.items() if k in ("ar", "dit", "vae")}}
            for name, t in times.items()}


def bench_training(steps: int) -> dict:
    import mindspore as ms

    from glimage.mindspore.train import AdamW, loss_and_grads, ms_stage
    from glimage.train.config import TrainConfig
    from glimage.train.data import prepare_data
    from glimage.train.stages import make_stage

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage_name in ("ar", "decoder"):
            cfg = TrainConfig(stage=stage_name, base="", out=f"{tmp}/{stage_name}", data_n=8, image_size=128,
                              batch_size=8, tensorboard=False)
            prepare_data(cfg)
            stage = make_stage(cfg)
            stage.setup(torch.device("cpu"), torch.float32)
            model, trainer = stage.build(), ms_stage(stage)
            batch = stage.collate([stage.dataset()[i] for i in range(8)])
            batch["sample_seeds"] = list(range(8))
            opt_t = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            opt_m = AdamW([p for _, p in trainer.model.parameters_and_names()])
            t_times, m_times = [], []
            for i in range(steps + 1):  # the first of each is a warm-up
                t0 = time.perf_counter()
                stage.step(model, batch, torch.Generator().manual_seed(i)).loss_sum.backward()
                opt_t.step()
                opt_t.zero_grad()
                t1 = time.perf_counter()
                _, count, grads = loss_and_grads(trainer, batch, torch.Generator().manual_seed(i))
                opt_m.step([g / count for g in grads], 1e-4)
                ms.runtime.synchronize()
                t2 = time.perf_counter()
                if i:
                    t_times.append(t1 - t0)
                    m_times.append(t2 - t1)
            out[f"tiny-{stage_name} step"] = {"torch": statistics.median(t_times),
                                              "mindspore": statistics.median(m_times)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from glimage.mindspore.pipeline import set_cpu_threads, set_device
    set_cpu_threads(args.threads)
    set_device("cpu")
    res = {"threads": args.threads, "generation": bench_generation(args.images), "training": bench_training(args.steps)}
    print(json.dumps(res, indent=2))
    g = res["generation"]
    print("\n| shipped model, 128x128, 20 steps | s/image | AR | DiT | VAE |\n|---|---|---|---|---|")
    for name, r in g.items():
        print(f"| {name} | {r['s_per_image']:.2f} | {r['ar']:.2f} | {r['dit']:.2f} | {r['vae']:.2f} |")
    print("\n| training step, batch 8 | torch s | MindSpore s | ratio |\n|---|---|---|---|")
    for name, r in res["training"].items():
        print(f"| {name} | {r['torch']:.3f} | {r['mindspore']:.3f} | {r['mindspore'] / r['torch']:.1f}x |")


if __name__ == "__main__":
    main()
