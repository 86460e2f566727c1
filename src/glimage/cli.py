"""`glimage` command line: generate, info, data. Thin: every subcommand maps onto the Python API."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path


def _generate(args) -> int:
    from .pipeline import GlmImagePipeline

    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"output {str(out)!r} must end in .png, .jpg, .jpeg or .webp")
    t0 = time.perf_counter()
    if args.model and args.model.startswith("random:"):  # any preset with random weights: smoke tests and benchmarks
        pipe = GlmImagePipeline.from_config(args.model[len("random:"):], seed=0, device=args.device, dtype=args.dtype)
    else:
        pipe = GlmImagePipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                                offload=args.offload)
    pipe.set_progress_bar_config(disable=args.quiet)
    t1 = time.perf_counter()
    result = pipe(args.prompt, image=args.image or None, height=args.height, width=args.width,
                  num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  num_images_per_prompt=args.num_images)
    t2 = time.perf_counter()
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                   for i in range(len(result.images))]
    out.parent.mkdir(parents=True, exist_ok=True)
    for img, path in zip(result.images, paths):
        # write to a temporary file then rename: an interrupted run never leaves a partial image
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
        os.close(fd)
        try:
            img.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        print(path)
    if not args.quiet:
        print(f"load {t1 - t0:.2f}s, generate {t2 - t1:.2f}s on {pipe.device} ({str(pipe.dtype).removeprefix('torch.')})",
              file=sys.stderr)
    return 0


def _info(args) -> int:
    from .checkpoint import tensor_headers
    from .convert.ar import read_ar_config

    root = Path(args.path)
    if not (root / "vision_language_encoder").is_dir():
        raise ValueError(f"{root} is not a GLM-Image folder (no vision_language_encoder/)")
    cfg = read_ar_config(root)
    print(f"{root}")
    print(f"  AR: {cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, visual head {cfg.text.vision_vocab_size}, "
          f"ViT {cfg.vision.depth} x {cfg.vision.hidden_size}, codebook {cfg.vq.num_embeddings}; "
          f"sizes {cfg.size_range[0]}-{cfg.size_range[1]} px in steps of {cfg.grid_factor}")
    total = 0
    for comp in ("vision_language_encoder", "text_encoder", "transformer", "vae"):
        if not (root / comp).is_dir():
            print(f"  {comp:24s} missing")
            continue
        heads = tensor_headers(root / comp)  # shapes and dtypes only: nothing is loaded
        n = sum(math.prod(shape) for shape, _ in heads.values())
        dtypes = sorted({dtype for _, dtype in heads.values()})
        total += n
        print(f"  {comp:24s} {n / 1e9:8.3f} B params  {len(heads):5d} tensors  {','.join(dtypes)}")
    print(f"  {'total':24s} {total / 1e9:8.3f} B params")
    return 0


def _data_shapes(args) -> int:
    from .data.shapes import generate_shapes

    t0 = time.perf_counter()
    records = generate_shapes(args.out, args.n, seed=args.seed, split=args.split)
    meta = Path(args.out) / "metadata.jsonl"
    print(f"{len(records)} {args.split} images in {time.perf_counter() - t0:.1f}s -> {meta}")
    return 0


def _train(args) -> int:
    from .train.cli import main as train_main

    return train_main(args.args)


def _eval_shapes(args) -> int:
    from .eval.shapes import evaluate, format_table
    from .pipeline import GlmImagePipeline

    pipe = GlmImagePipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    table = evaluate(pipe, args.n_per_category, args.seed, args.out, args.steps, args.guidance)
    print(format_table(table))
    if args.out:
        print(f"samples: {args.out}/samples.png, details: {args.out}/results.jsonl", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glimage", description="GLM-Image in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text-to-image or image-to-image")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="GLM-Image folder (official layout), or random:PRESET (e.g. "
                   "random:tiny); default: the small model shipped in the package")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--image", action="append", help="source image for editing (repeat for several)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, officially 50)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, officially 1.5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--device", default=None, help="cpu, cuda, npu, mps (default: best available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU/NPU, fp32 on CPU)")
    g.add_argument("--offload", action="store_true", help="keep weights on the CPU, move each stage to the GPU")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(fn=_generate)
    i = sub.add_parser("info", help="components, parameter counts and dtypes of a model folder")
    i.add_argument("path")
    i.set_defaults(fn=_info)
    # everything after `train` (--help and --set included) goes to glimage.train.cli's own parser; no
    # prefix chars here, else argparse keeps a leading option such as --help out of the REMAINDER
    t = sub.add_parser("train", help="train a stage: glimage train CONFIG [--set key=value ...]",
                       add_help=False, prefix_chars="\0")
    t.add_argument("args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="automatic evaluation")
    esub = e.add_subparsers(dest="eval_command", required=True)
    es = esub.add_parser("shapes", help="score a model on the fixed seeded shapes prompt set (objects + OCR)")
    es.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    es.add_argument("--n-per-category", type=int, default=8)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--steps", type=int, default=None, help="default: the model's")
    es.add_argument("--guidance", type=float, default=None, help="default: the model's")
    es.add_argument("--out", default=None, help="write samples.png, table.md, results.jsonl here")
    es.add_argument("--device", default=None)
    es.add_argument("--dtype", default=None)
    es.set_defaults(fn=_eval_shapes)
    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="synthetic captioned shapes dataset (folder with metadata.jsonl)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=("train", "eval"), default="train",
                   help="train leaves out green triangles and yellow circles; eval includes them")
    s.set_defaults(fn=_data_shapes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"glimage {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
