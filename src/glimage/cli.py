"""`glimage` command line: generate, info, train, eval, data. Thin: every subcommand maps onto the Python API.

Errors: bad input (glimage.validate.InputError: arguments, files, model folders) exits with status 2 and one
line naming the value and the allowed range; anything else is a bug and exits with 1, a short message and a
hint to rerun with --debug for the traceback (cliargs.run). SIGTERM ends a run like Ctrl-C: cleanly, no
partial file.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

from . import __version__
from .backends import BACKENDS
from .cliargs import Parser, device_args, fast_args, leaf, load_pipeline, model_spec, run
from .validate import InputError

MAX_CLI_IMAGES = 1000  # --num-images: independent draws, one after another (memory stays that of one)


def _generate(args) -> int:
    from .image import load_image
    from .validate import MAX_GUIDANCE, check_float, check_int, check_output_paths, check_prompt, check_seed, parse_size

    if args.prompts is not None or args.prompt is None:
        return _generate_batch(args)
    for flag, value in (("--out", args.out), ("--ray", args.ray)):
        if value is not None:
            raise InputError(f"{flag} goes with --prompts FILE.jsonl (for one prompt use -o FILE)", flag[2:])
    # every check that needs no model runs before any model is loaded, and before a fresh seed is announced
    prompt = check_prompt(args.prompt)
    if args.size is not None:
        if args.height is not None or args.width is not None:
            raise InputError("give --size WxH or --height/--width, not both", "size")
        args.height, args.width = parse_size(args.size)
    n = check_int("--num-images", args.num_images, 1, MAX_CLI_IMAGES)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    check_seed(seed, n)
    if args.steps is not None:
        check_int("--steps", args.steps, 1, 1000)
    if args.guidance is not None:
        check_float("--guidance", args.guidance, 0, MAX_GUIDANCE)
    if args.step_cache is not None:
        check_float("--step-cache", args.step_cache, 0, 10, lo_open=True)
    paths = check_output_paths(args.output, n)
    sources = [load_image(p, "--image") for p in args.image or []]
    preset, folder = model_spec(args.model)
    if args.backend == "mindspore":
        torch_only = [f for f, on in (("--offload", args.offload),
                                      ("--step-cache", args.step_cache), ("--ar-int8", args.ar_int8)) if on]
        if torch_only:
            raise InputError(f"{', '.join(torch_only)}: PyTorch backend only (drop it or use --backend torch)",
                             "backend")
    _check_size_early(preset, folder, args.height, args.width, sources)

    t0 = time.perf_counter()
    pipe, threads = load_pipeline(args, preset, folder)
    load_s = time.perf_counter() - t0
    if args.seed is None and not args.quiet:
        print(f"seed {seed} (pass --seed {seed} to draw {'these' if n > 1 else 'this'} again)", file=sys.stderr)
    from .outputs import save_image
    for i, path in enumerate(paths):
        t1 = time.perf_counter()
        # independent draws, AR included: image i is exactly `--seed seed+i --num-images 1`
        result = pipe(prompt, image=sources or None, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed + i)
        params = {**result.parameters, "model": args.model or "shipped", "glimage": __version__, **pipe.fast}
        if args.backend != "torch":
            params["backend"] = args.backend
        if args.image:
            params["images"] = [Path(p).name for p in args.image]
        save_image(result.images[0], path, params)
        print(path)
        if not args.quiet:
            print(f"  seed {seed + i}: {time.perf_counter() - t1:.2f}s", file=sys.stderr)
    if not args.quiet:
        where = f"MindSpore {pipe.target}" if args.backend == "mindspore" else pipe.device
        print(f"load {load_s:.2f}s on {where} ({str(pipe.dtype).removeprefix('torch.')}, "
              f"{threads} CPU thread{'s' if threads > 1 else ''})", file=sys.stderr)
    return 0


def _generate_batch(args) -> int:
    """`glimage generate --prompts FILE.jsonl --out DIR [--ray [ADDRESS]]` (glimage.batch)."""
    from .batch import read_jobs, run
    from .card import ModelCard
    from .validate import check_seed

    if args.prompts is None:
        raise InputError("give a PROMPT, or --prompts FILE.jsonl with --out DIR", "prompt")
    if args.prompt is not None:
        raise InputError("give a PROMPT or --prompts FILE.jsonl, not both", "prompts")
    if args.out is None:
        raise InputError("--prompts needs --out DIR (the images and metadata.jsonl go there)", "out")
    single = [f for f, on in (("--image", args.image), ("--num-images", args.num_images != 1),
                              ("-o", args.output != "out.png"), ("--height/--width", args.height or args.width),
                              ("--backend", args.backend != "torch")) if on]
    if single:
        raise InputError(f"{', '.join(single)}: not with --prompts (put size and images on each line)", "prompts")
    if args.ray is None and (args.ar_actors != 1 or args.dit_actors is not None or args.gpus_per_actor):
        raise InputError("--ar-actors, --dit-actors and --gpus-per-actor go with --ray", "ray")
    preset, folder = model_spec(args.model)
    seed = check_seed(args.seed if args.seed is not None else 0)
    jobs = read_jobs(args.prompts, ModelCard.read(preset, folder), seed, args.steps, args.guidance, args.size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file, not a folder", "out")
    model = args.model or "shipped"
    t0 = time.perf_counter()
    if args.ray is not None:
        from .cluster.data import run_on_ray
        drawn = run_on_ray(jobs, out, args, progress=not args.quiet)
    else:
        pipe, _ = load_pipeline(args, preset, folder)
        pipe.set_progress_bar_config(disable=True)  # one bar for the batch, not one per image
        drawn = run(pipe, jobs, out, model, progress=not args.quiet)
    if not args.quiet:
        print(f"{drawn} image(s) drawn, {len(jobs) - drawn} already there, in {time.perf_counter() - t0:.1f}s: "
              f"{out / 'metadata.jsonl'}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    """`glimage serve`: in this process, or with --ray as a Ray Serve application (glimage.cluster)."""
    from .serve import check_args, main as serve_here

    if args.ray is None:
        return serve_here(args)
    keys = check_args(args)
    from .cluster import require_ray
    require_ray()  # a clear "pip install" line, not an ImportError
    from .cluster.serve import main as serve_on_ray
    return serve_on_ray(args, keys)


def _check_size_early(preset: str, folder: Path | None, height, width, sources: list) -> None:
    """The size rules of the model (a folder's JSON files alone, or the preset's config), before minutes of
    weight loading and before a fresh seed is announced. A side left unset takes the model's default, as the
    pipeline resolves it (GlmImagePipeline.default_size): the folder's glimage.json, else 1024 within the
    model's range; for an edit the first source's size, snapped to the grid and the range."""
    from .card import ModelCard
    from .validate import check_target_size

    card = ModelCard.read(preset, folder)
    if height is None or width is None:
        dh, dw = card.default_size(sources[0].size if sources else None)
        height, width = dh if height is None else height, dw if width is None else width
    check_target_size(height, width, card.ar_cfg, text_to_image=not sources)


def _info(args) -> int:
    path = Path(args.path) if args.path else None
    if path is not None and path.is_file():
        return _info_image(path)
    from .pipeline import DEFAULT_MODEL
    if model_spec(str(path) if path else None, "PATH")[0]:
        raise InputError(f"PATH {str(path)!r}: info reads a model folder or an image; random:PRESET has no folder",
                         "path")
    return _info_folder(path or DEFAULT_MODEL, shipped=path is None)


def _info_image(path: Path) -> int:
    from .outputs import read_parameters

    params = read_parameters(path)
    if params is None:
        raise InputError(f"{str(path)!r} carries no glimage generation parameters (not made by glimage "
                         "generate, or its metadata was stripped)", "path")
    print(path)
    order = ["prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale", "model", "images"]
    for k in sorted(params, key=lambda k: order.index(k) if k in order else len(order)):
        print(f"  {k:20s} {params[k]}")
    return 0


def _info_folder(root: Path, shipped: bool) -> int:
    import math

    from .checkpoint import read_json, tensor_headers
    from .convert.ar import read_ar_config
    from .pipeline import CALL_DEFAULTS

    cfg = read_ar_config(root)
    defaults = {**CALL_DEFAULTS, **(read_json(root / "glimage.json") if (root / "glimage.json").is_file() else {})}
    lo, hi = cfg.size_range
    print(f"{root}" + ("  (the model shipped with glimage, used when no --model is given)" if shipped else ""))
    print(f"  AR: {cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, visual head "
          f"{cfg.text.vision_vocab_size}, ViT {cfg.vision.depth} x {cfg.vision.hidden_size}, codebook {cfg.vq.num_embeddings}")
    print(f"  sizes: multiples of {cfg.grid_factor} px from {lo} to {hi}" + (
        "" if cfg.max_size is not None else f" (the longest side whose tokens fit the AR's context of "
        f"{cfg.text.max_position_embeddings})"))
    size = f"{defaults['width']}x{defaults['height']}" if "height" in defaults else "1024x1024 (clamped to the sizes)"
    print(f"  defaults: {size}, {defaults['num_inference_steps']} steps, guidance {defaults['guidance_scale']}")
    total = 0
    for comp in ("vision_language_encoder", "text_encoder", "transformer", "vae"):
        if not (root / comp).is_dir():
            print(f"  {comp:24s} missing")
            continue
        heads = tensor_headers(root / comp)  # shapes and dtypes only: nothing is loaded
        n = sum(math.prod(shape) for shape, _ in heads.values())
        dtypes = sorted({dtype for _, dtype in heads.values()})
        total += n
        print(f"  {comp:24s} {n / 1e9:8.4f} B params  {len(heads):5d} tensors  {','.join(dtypes)}")
    print(f"  {'total':24s} {total / 1e9:8.4f} B params")
    if shipped:
        print("  trained by scripts/train_shapes.sh on the synthetic `shapes` set: coloured circles, squares and\n"
              "  triangles, their positions and relations, and signs with short capital words (see\n"
              "  docs/shapes-model.md). It draws nothing outside that world and was not trained for editing.")
    return 0


def _data_shapes(args) -> int:
    from .data.shapes import generate_shapes
    from .validate import check_int

    check_int("--n", args.n, 1)
    t0 = time.perf_counter()
    records = generate_shapes(args.out, args.n, seed=args.seed, split=args.split)
    meta = Path(args.out) / "metadata.jsonl"
    print(f"{len(records)} {args.split} images in {time.perf_counter() - t0:.1f}s -> {meta}")
    return 0


def _train(args) -> int:
    from .train.cli import main as train_main

    return train_main(args.args, handle_errors=False)


def _eval_shapes(args) -> int:
    from .device import set_threads
    from .eval.shapes import evaluate, format_table
    from .pipeline import GlmImagePipeline
    from .validate import check_int

    check_int("--n-per-category", args.n_per_category, 1, 1000)
    set_threads(args.threads)
    pipe = GlmImagePipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    table: dict = {}
    for seed in args.seed:
        out = args.out if not args.out or len(args.seed) == 1 else f"{args.out}/seed-{seed}"
        one = evaluate(pipe, args.n_per_category, seed, out, args.steps, args.guidance)
        table = {k: tuple(a + b for a, b in zip(table.get(k, (0, 0)), v)) for k, v in one.items()}
    if len(args.seed) > 1:
        print(f"prompt sets {', '.join(map(str, args.seed))}, summed:")
    print(format_table(table))
    if args.out:
        print(f"samples: {args.out}/samples.png, details: {args.out}/results.jsonl", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)  # also after the subcommand, without resetting a --debug before it
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an unexpected error")
    p = Parser(prog="glimage", description="GLM-Image in plain PyTorch")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    p.add_argument("--version", action="version", version=f"glimage {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text-to-image or image-to-image", parents=[debug],
                       description="Generate images. Unset options take the model's own defaults: the shipped "
                       "model draws 128x128 in 20 steps with guidance 3.0, the official one 1024x1024 in 50 steps "
                       "with guidance 1.5 (`glimage info MODEL` prints them).")
    g.add_argument("prompt", nargs="?", default=None, help="what to draw; quoted text (\"OPEN\") is drawn as "
                   "lettering (or --prompts FILE.jsonl)")
    g.add_argument("--model", default=None, help="GLM-Image folder (official layout), or random:PRESET (e.g. "
                   "random:tiny); default: the small model shipped in the package")
    g.add_argument("-o", "--output", default="out.png", help="PNG, JPEG or WebP file; with --num-images N: "
                   "NAME_0.png ... NAME_{N-1}.png (default out.png)")
    g.add_argument("--image", action="append", help="source image for editing (repeat for several)")
    g.add_argument("--height", type=int, default=None, help="pixels; a multiple of the model's grid: 16 for the "
                   "shipped model, 32 in [512, 2048] for the official one (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="pixels, as --height")
    g.add_argument("--size", default=None, metavar="WxH", help="width and height in one, e.g. 128x128 (as "
                   "`glimage bench` and the server take it); instead of --height/--width")
    g.add_argument("--steps", type=int, default=None, help="denoising steps, 1-1000 (default: the model's: 20 "
                   "shipped, 50 official)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 0-50; <= 1 turns "
                   "it off (default: the model's: 3.0 shipped, 1.5 official)")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (default: a fresh random seed, "
                   "printed); image i of --num-images uses seed + i")
    g.add_argument("--num-images", type=int, default=1, help=f"independent draws (AR included), 1-{MAX_CLI_IMAGES}")
    device_args(g)
    g.add_argument("--offload", action="store_true", help="keep weights on the CPU, move each stage to the GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the AR decode step and the DiT blocks "
                   "(CUDA: the decode as a CUDA graph); with --backend mindspore: both in graph mode (ms.jit); pays off "
                   "over many images or large models")
    fast_args(g)
    g.add_argument("--backend", choices=BACKENDS, default="torch", help="run the models in PyTorch "
                   "(default) or MindSpore (pip install \"glimage[mindspore]\"; same seed, same tokens, the image "
                   "within 1/255; slower on a CPU: see README)")
    b = g.add_argument_group("batch", "many prompts into a folder, resumable (see glimage.batch)")
    b.add_argument("--prompts", default=None, metavar="FILE.jsonl", help="one JSON object per line: prompt, and "
                   "optionally seed (default --seed + line), size, num_inference_steps, guidance_scale, image, "
                   "file_name; instead of PROMPT")
    b.add_argument("--out", default=None, metavar="DIR", help="with --prompts: the images and metadata.jsonl "
                   "(Hugging Face imagefolder); a rerun skips the images already there")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="with --prompts: run "
                   "on Ray Data, the AR and the DiT as separate actor pools (pip install \"glimage[ray]\"); "
                   "ADDRESS of a running cluster (e.g. auto), else a local one")
    b.add_argument("--ar-actors", type=int, default=1, help="with --ray: AR actors (default 1)")
    b.add_argument("--dit-actors", type=int, default=None, help="with --ray: DiT actors (default: the cluster's "
                   "CPUs or GPUs left after the AR's)")
    b.add_argument("--gpus-per-actor", type=float, default=0, help="with --ray: GPUs each actor takes (default 0)")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(fn=_generate)
    i = sub.add_parser("info", help="a model folder (default: the shipped model) or an image's generation "
                       "parameters", parents=[debug])
    i.add_argument("path", nargs="?", default=None, metavar="PATH",
                   help="model folder or image file (default: the shipped model)")
    i.set_defaults(fn=_info)
    # everything after `train` (--help and --set included) goes to glimage.train.cli's own parser; no
    # prefix chars here, else argparse keeps a leading option such as --help out of the REMAINDER
    t = sub.add_parser("train", help="train a stage: glimage train CONFIG [--set key=value ...]",
                       add_help=False, prefix_chars="\0")
    t.add_argument("args", nargs=argparse.REMAINDER)
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="automatic evaluation")
    esub = e.add_subparsers(dest="eval_command", required=True)
    es = esub.add_parser("shapes", help="score a model on the fixed seeded shapes prompt set (objects + OCR)",
                         parents=[debug])
    es.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    es.add_argument("--n-per-category", type=int, default=8)
    es.add_argument("--seed", type=int, nargs="+", default=[0],
                    help="prompt set(s); several are summed (each in OUT/seed-N with --out)")
    es.add_argument("--steps", type=int, default=None, help="default: the model's")
    es.add_argument("--guidance", type=float, default=None, help="default: the model's")
    es.add_argument("--out", default=None, help="write samples.png, table.md, results.jsonl here")
    device_args(es)
    es.set_defaults(fn=_eval_shapes)
    from .bench import add_parser as add_bench_parser
    from .check import add_parser as add_check_parser
    from .serve import add_parser as add_serve_parser
    add_serve_parser(sub, [debug]).set_defaults(fn=_serve)
    add_bench_parser(sub, [debug])
    add_check_parser(sub, [debug])
    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("shapes", help="synthetic captioned shapes dataset (folder with metadata.jsonl)",
                        parents=[debug])
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=("train", "eval"), default="train",
                   help="train leaves out green triangles and yellow circles; eval includes them")
    s.set_defaults(fn=_data_shapes)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the subcommand's parser: its usage, the closest of its options
        leaf(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    debug = getattr(args, "debug", False) or (args.command == "train" and "--debug" in args.args)
    return run(f"glimage {args.command}", lambda: args.fn(args), debug)


if __name__ == "__main__":
    sys.exit(main())
