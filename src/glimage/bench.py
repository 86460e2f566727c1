"""`glimage bench`: a fixed workload, timed stage by stage, optionally side by side with the reference.

    glimage bench [MODEL | --preset NAME] [--size WxH] [--steps N] [--guidance G] [--batch B] [--i2i]
                  [--runs N] [--compare-reference] [--json FILE]

A model folder (default: the shipped model, at its own size, steps and guidance), or a preset with random
weights built directly on the device in the chosen dtype (`--preset glm-image` times the full-size model on a
GPU without a download). After a warm-up, each run draws
the same image(s) with the same seed through `GlmImagePipeline.__call__` (what the CLI runs) and a Timer
records its stages: AR prefill and decode, glyph encoding, DiT, VAE. With --compare-reference the reference
(transformers + diffusers, when installed) loads the same weights and the two take turns run by run, so that
both see the same machine; their images are compared too.

The AR decode's roofline: per generated token it reads every weight of the language model and head once, plus
the KV cache so far; that many bytes over the measured time per token, against the device's memory bandwidth
(CUDA: from its properties; CPU: a measured copy, or --bandwidth GB/s).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .device import peak_memory_bytes, resolve_device, resolve_dtype, synchronize
from .timing import Timer
from .validate import InputError

PROMPT = 'A red sign that says "OPEN 24h" on a brick wall, a blue square to its left'


@dataclass(frozen=True)
class Workload:
    height: int
    width: int
    steps: int
    guidance: float
    batch: int = 1
    i2i: bool = False
    seed: int = 0


def load(model: str | None, preset: str | None, device, dtype):
    """(pipeline, seconds to build or load it)."""
    from .pipeline import GlmImagePipeline
    synchronize(resolve_device(device))
    t0 = time.perf_counter()
    if preset:
        pipe = GlmImagePipeline.from_config(preset, seed=0, device=device, dtype=dtype)
        # A trained AR never predicts the head's ids past the codebook (image start/end); random weights would,
        # and the reference, which samples over the whole head, then indexes past its DiT's codebook. Zero rows
        # score 0, never among the top-k of thousands of random logits: both sides draw codebook ids only.
        head = pipe.ar.lm_head  # an nn.Linear or a layouts.PackedLinear: both reload from a state dict
        w = head.weight.detach().clone()
        w[pipe.ar.cfg.vq.num_embeddings:] = 0
        head.load_state_dict({"weight": w})
    else:
        pipe = GlmImagePipeline.from_pretrained(model, device=device, dtype=dtype)
    synchronize(pipe.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - t0


def source_image(height: int, width: int):
    """A smooth, deterministic source image (low-frequency noise survives resizing like a photo does)."""
    import numpy as np
    from PIL import Image
    small = np.random.RandomState(0).randint(0, 255, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def run_ours(pipe, wl: Workload) -> tuple[dict, object]:
    timer = Timer(pipe.device)
    images = [[source_image(wl.height, wl.width)] for _ in range(wl.batch)] if wl.i2i else None
    with timer("total"):
        out = pipe([PROMPT] * wl.batch, image=images, height=wl.height, width=wl.width, num_inference_steps=wl.steps,
                   guidance_scale=wl.guidance, seed=wl.seed, output_type="np", timer=timer)
    return dict(timer.times), out.images


def ar_bytes_per_token(pipe, wl: Workload) -> tuple[float, int]:
    """(bytes the AR decode reads per generated token: language model + head weights and the KV cache at its
    average length over the decode, for the whole batch; the number of generated tokens)."""
    from .prompt import build_prompts
    ar, t = pipe.ar, pipe.ar.cfg.text
    # buffers too: packed (glimage.layouts) and int8 (glimage.fast) weights are buffers
    tensors = [*ar.named_parameters(), *ar.named_buffers()]
    weights = sum(p.numel() * p.element_size() for n, p in tensors
                  if n.startswith(("language_model.", "lm_head.")) and "embed_tokens" not in n and not n.endswith(".scale_f"))
    grids = [[(wl.height // ar.cfg.grid_factor, wl.width // ar.cfg.grid_factor)]] if wl.i2i else None
    batch = build_prompts([PROMPT], wl.height, wl.width, pipe.tokenizer, ar.cfg, grids)  # i2i: a source ~ target
    n_new = sum(h * w for h, w in batch.grids)
    avg_len = batch.input_ids.shape[1] + n_new / 2
    kv = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * avg_len * ar.dtype.itemsize
    return weights + wl.batch * kv, n_new


def bandwidth(device: torch.device, given: float | None) -> float:
    """Bytes per second the device's memory can deliver: given, CUDA's spec, or a measured CPU copy."""
    if given:
        return given * 1e9
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock and bus:
            return 2 * clock * 1e3 * bus / 8  # DDR: two transfers per clock (kHz), bus width in bits
    x = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device)  # 64 MiB: beyond the caches
    y = torch.empty_like(x)
    y.copy_(x)
    best = math.inf
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best  # read + write


class Reference:
    """The reference pipeline (diffusers' GlmImagePipeline) on the same folder, its stages timed by wrapping
    the AR's generate, the DiT's forward and the VAE's decode."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        try:
            from diffusers import GlmImagePipeline as RefPipeline
        except ImportError as e:
            raise InputError(f"--compare-reference needs the reference packages: pip install -e '.[test]' ({e})")
        synchronize(device)
        t0 = time.perf_counter()
        self.pipe = RefPipeline.from_pretrained(folder, dtype=dtype).to(device)
        synchronize(device)
        self.load_s = time.perf_counter() - t0
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.timer = device, Timer(device)
        for owner, name, stage in ((self.pipe.vision_language_encoder, "generate", "ar"),
                                   (self.pipe.transformer, "forward", "dit"), (self.pipe.vae, "decode", "vae")):
            setattr(owner, name, self._timed(getattr(owner, name), stage))

    def _timed(self, fn, stage):
        def wrapper(*args, **kwargs):
            with self.timer(stage):
                return fn(*args, **kwargs)
        return wrapper

    def run(self, wl: Workload):
        self.timer = Timer(self.device)
        with self.timer("total"):
            out = self.pipe([PROMPT] * wl.batch, height=wl.height, width=wl.width, num_inference_steps=wl.steps,
                            guidance_scale=wl.guidance, generator=torch.Generator().manual_seed(wl.seed),
                            output_type="np")
        return dict(self.timer.times), out.images


def bench(model: str | None, preset: str | None, wl: Workload, runs: int = 3, device=None, dtype=None,
          compare_reference: bool = False, given_bandwidth: float | None = None, compile: bool = False,
          fast: dict | None = None, offload: bool = False) -> dict:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if compare_reference and wl.i2i:
        raise InputError("--compare-reference times text-to-image only (the reference's image-to-image needs a "
                         "patch for a version-skew bug; see tests/reference.py)")
    label = f"random:{preset}" if preset else model
    if compare_reference and preset:  # the preset's random weights, saved: both sides then load the same folder
        tmp = tempfile.TemporaryDirectory()
        load(None, preset, "cpu", dt)[0].save_pretrained(tmp.name)
        model, preset = tmp.name, None
    pipe, load_s = load(model, preset, dev, dt)
    if offload:  # each component visits the accelerator only while it runs
        pipe.enable_model_cpu_offload()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
    if compile:
        pipe.enable_compile()  # compiled during the warm-up run, which is not timed
    pipe.enable_fast(**(fast or {}))
    ref = Reference(Path(model), dev, dt) if compare_reference else None
    run_ours(pipe, wl)  # warm-up (allocations, kernel choice)
    if ref:
        ref.run(wl)
    ours, theirs, diffs = [], [], []
    for _ in tqdm(range(runs), desc="bench runs", leave=False):
        times, img = run_ours(pipe, wl)
        ours.append(times)
        if ref:
            rtimes, rimg = ref.run(wl)
            theirs.append(rtimes)
            diffs.append(float(abs(img - rimg).max()))
    per_token_bytes, n_new = ar_bytes_per_token(pipe, wl)
    bw = bandwidth(dev, given_bandwidth)
    row = summarize(ours, wl, n_new)
    decode = row["ar_decode_s"]
    row.update(load_s=load_s, peak_memory_gb=peak_memory_bytes(dev) / 1e9,
               roofline_fraction=(per_token_bytes * n_new / decode) / bw if decode else None,
               bandwidth_gbs=bw / 1e9)
    result = {"workload": asdict(wl), "model": label, "device": str(dev), "compiled": compile, "fast": pipe.fast,
              "offload": offload,
              "dtype": str(dt).removeprefix("torch."), "runs": runs, "ours": row}
    if ref:
        result["reference"] = dict(summarize(theirs, wl, n_new), load_s=ref.load_s)
        result["max_abs_image_diff"] = max(diffs)
    return result


def summarize(runs: list[dict], wl: Workload, n_new: int) -> dict:
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    total = med["total"]
    out = {"end_to_end_s": total, "images_per_s": wl.batch / total, "ar_s": med.get("ar", 0.0),
           "dit_s_per_step": med.get("dit", 0.0) / wl.steps, "vae_s": med.get("vae", 0.0)}
    if "ar_decode" in med:
        out.update(ar_prefill_s=med["ar_prefill"], ar_decode_s=med["ar_decode"],
                   ar_decode_tokens_per_s=wl.batch * n_new / med["ar_decode"])
    return out


def format_table(result: dict) -> str:
    wl = result["workload"]
    mode = ", ".join([*(["compiled"] if result.get("compiled") else []), *(f"{k}={v}" for k, v in result["fast"].items())])
    head = (f"{result['model']}{f' ({mode})' if mode else ''} on {result['device']} ({result['dtype']}), {wl['width']}x{wl['height']}, {wl['steps']} "
            f"steps, CFG {wl['guidance']}, batch {wl['batch']}{', image-to-image' if wl['i2i'] else ''}; median of "
            f"{result['runs']} runs")
    rows = [("load", "load_s", "s"), ("AR prefill", "ar_prefill_s", "s"), ("AR decode", "ar_decode_s", "s"),
            ("AR decode", "ar_decode_tokens_per_s", "tok/s"), ("AR total", "ar_s", "s"),
            ("DiT per step", "dit_s_per_step", "s"), ("VAE", "vae_s", "s"), ("end to end", "end_to_end_s", "s"),
            ("images/s", "images_per_s", ""), ("peak memory", "peak_memory_gb", "GB"),
            ("AR decode roofline", "roofline_fraction", "")]
    ours, ref = result["ours"], result.get("reference")
    lines = [head, f"{'':22s} {'glimage':>12s}" + (f" {'reference':>12s} {'ratio':>7s}" if ref else "")]
    for label, key, unit in rows:
        if ours.get(key) is None and (not ref or ref.get(key) is None):
            continue
        v = ours.get(key)
        cell = "-" if v is None else (f"{v:.1%}" if key == "roofline_fraction" else f"{v:.4g} {unit}".strip())
        line = f"{label:22s} {cell:>12s}"
        if ref:
            r = ref.get(key)
            rcell = "-" if r is None else f"{r:.4g} {unit}".strip()
            faster = key not in ("ar_decode_tokens_per_s", "images_per_s")
            ratio = (r / v if faster else v / r) if (r and v) else None
            line += f" {rcell:>12s} {(f'{ratio:.2f}x' if ratio else ''):>7s}"
        lines.append(line)
    if "roofline_fraction" in ours:
        lines.append(f"(roofline against {ours['bandwidth_gbs']:.0f} GB/s)")
    if ref:
        lines.append(f"images: max |ours - reference| = {result['max_abs_image_diff']:.2e} (of 1); ratio > 1: "
                     "glimage faster")
    return "\n".join(lines)


def main(args) -> int:
    from .device import set_threads
    from .validate import check_float, check_int, parse_size
    if args.model and args.preset:
        raise InputError("give a model folder or --preset NAME (random weights), not both", "model")
    height, width, steps, guidance, model = workload_defaults(args.model, args.preset, args.i2i)
    if args.size:
        height, width = parse_size(args.size)
    steps = steps if args.steps is None else args.steps
    guidance = guidance if args.guidance is None else args.guidance
    check_int("--runs", args.runs, 1, 1000)
    check_int("--batch", args.batch, 1, 64)
    set_threads(args.threads)
    check_float("--guidance", guidance, 0, 50)
    check_int("--steps", steps, 1, 1000)
    wl = Workload(height, width, steps, guidance, args.batch, args.i2i)
    _check_workload(model, args.preset, wl)
    result = bench(model, args.preset, wl, args.runs, args.device, args.dtype, args.compare_reference,
                   args.bandwidth, args.compile, {"step_cache": args.step_cache, "ar_int8": args.ar_int8},
                   args.offload)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def workload_defaults(model: str | None, preset: str | None, i2i: bool) -> tuple[int, int, int, float, str | None]:
    """(height, width, steps, guidance, model folder) a bench runs when not told: the model's own (its
    glimage.json; the shipped model without --model or --preset), else 1024 within its range, 50 steps, 1.5."""
    from .checkpoint import read_json
    from .cliargs import model_spec
    from .config import PRESETS
    from .convert.ar import read_ar_config
    from .pipeline import CALL_DEFAULTS
    from .validate import default_size
    if preset:
        if preset not in PRESETS:
            raise InputError(f"--preset {preset!r}: unknown; presets: {', '.join(PRESETS)}", "preset")
        cfg, defaults = PRESETS[preset].ar, {}
    else:
        _, folder = model_spec(model)
        cfg, model = read_ar_config(folder), str(folder)
        defaults = read_json(folder / "glimage.json") if (folder / "glimage.json").is_file() else {}
    defaults = {**CALL_DEFAULTS, **defaults}
    height, width = default_size(cfg, defaults, (1024, 1024) if i2i else None)
    return height, width, defaults["num_inference_steps"], defaults["guidance_scale"], model


def _check_workload(model: str | None, preset: str | None, wl: Workload) -> None:
    """The size against the model before anything is built or loaded."""
    from .config import PRESETS
    from .convert.ar import read_ar_config
    from .validate import check_target_size
    cfg = PRESETS[preset].ar if preset else read_ar_config(model)
    check_target_size(wl.height, wl.width, cfg, text_to_image=not wl.i2i)


def add_parser(sub, parents=()) -> None:
    from .cliargs import device_args
    b = sub.add_parser("bench", help="time a fixed workload stage by stage (optionally against the reference)",
                       parents=list(parents))
    b.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped model), or --preset")
    b.add_argument("--preset", default=None, help="random weights of a preset: tiny, mid, shapes, slice (the "
                   "official widths, 2 layers per stack), glm-image")
    b.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's; 1024x1024 within its range "
                   "for a preset)")
    b.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; 50)")
    b.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's; 1.5)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--i2i", action="store_true", help="image-to-image (one source image per prompt)")
    b.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    b.add_argument("--compare-reference", action="store_true", help="also run transformers + diffusers on the same "
                   "weights, interleaved with ours (text-to-image)")
    b.add_argument("--bandwidth", type=float, default=None, help="device memory bandwidth in GB/s for the roofline "
                   "(default: CUDA's spec, or a measured copy on the CPU)")
    b.add_argument("--compile", action="store_true", help="time the compiled path (GlmImagePipeline.enable_compile)")
    b.add_argument("--offload", action="store_true", help="time with the weights in CPU memory, each component "
                   "moved to the accelerator while it runs (GlmImagePipeline.enable_model_cpu_offload)")
    from .cliargs import fast_args
    fast_args(b)
    b.add_argument("--json", default=None, help="also write the results here")
    device_args(b)
    b.set_defaults(fn=main)
