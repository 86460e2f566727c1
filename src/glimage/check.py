"""`glimage check`: conformance of a device and dtype, component by component, at the official widths.

    glimage check --device npu --dtype bfloat16     # what an Ascend, CUDA or Mac user runs first

Each component of the preset `slice` (the published model's widths, 2 layers per stack, seeded random weights)
runs on fixed inputs twice: in fp32 on the CPU (the truth) and on the device in the dtype. The table gives
each output's relative error, ||y - y_fp32|| / ||y_fp32||, against that dtype's tolerance, and the command
exits 1 when one is out of it.

The tolerances are 1.25x the reference's own error in that dtype on the same weights and inputs, measured on
the CPU by scripts/check_tolerances.py (transformers + diffusers). glimage's CPU path makes the same error to
three digits (`glimage check --device cpu --dtype bfloat16 --measure`). A device whose kernels round like the
CPU's lands near 0.8 of its tolerance; one that computes in a lower precision than asked (TF32 for fp32, fp16
accumulation) lands above it. fp16 has no tolerance yet for the AR and the VAE (too slow to measure on a CPU
without fp16 units): their rows are reported, not judged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from .config import get_preset
from .device import resolve_device, resolve_dtype, synchronize
from .layouts import pack_linears
from .validate import InputError

PRESET = "slice"
# bf16, fp16: 1.25 x the reference's own error (scripts/check_tolerances.py, AMD EPYC, one thread, 2026-12-04; bf16:
# ar 8.16e-3, vision 4.99e-3, glyph 4.88e-3, dit 6.06e-3, vae 2.48e-2; fp16: vision 6.21e-4, glyph 6.09e-4, dit
# 7.93e-4; glimage's: the same to three digits). Components without a tolerance are reported, not judged.
# fp32: kernels of two devices differ by ~1e-6; 1e-3 also admits TF32 convolutions (cuDNN's default), not TF32
# matmuls.
TOLERANCES = {
    "float32": {"ar": 1e-3, "vision": 1e-3, "glyph": 1e-3, "dit": 1e-3, "vae": 1e-3},
    "bfloat16": {"ar": 0.0102, "vision": 0.00623, "glyph": 0.0061, "dit": 0.00758, "vae": 0.031},
    "float16": {"vision": 7.76e-4, "glyph": 7.61e-4, "dit": 9.91e-4},  # ar, vae: not measured (slow here)
}


@dataclass
class Component:
    name: str
    build: object  # () -> nn.Module, fp32 on the CPU, seeded
    inputs: object  # () -> dict of tensors (float ones in fp32)
    run: object  # (module, inputs) -> tensor


def _seeded(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def components(preset: str = PRESET, size: int = 256) -> list[Component]:
    """The five components at `preset`'s widths with inputs for a size x size image."""
    from .models.ar import TextModel
    from .models.dit import GlmImageDiT
    from .models.glyph import GlyphEncoder
    from .models.vae import AutoencoderKL
    from .models.vision import VisionEncoder
    cfg = get_preset(preset)
    t, d, v = cfg.ar.text, cfg.dit, cfg.vae
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    lat = size // v.downsample

    def ar_inputs():
        n = 48
        ids = torch.randint(0, t.vocab_size, (1, n), generator=gen(1))
        pos = torch.arange(n).expand(3, 1, n)
        return {"ids": ids, "pos": pos}

    def ar_run(m, x):
        h = m.language_model(x["ids"], x["pos"])
        return m.lm_head(h)  # (1, L, V)

    def vision_inputs():
        side = cfg.ar.vision.patch_size * 16
        return {"pixels": torch.rand(1, 3, side, side, generator=gen(2)) * 2 - 1}

    def dit_inputs():
        n = (lat // d.patch_size) ** 2
        return {"latents": torch.randn(1, d.in_channels, lat, lat, generator=gen(3)),
                "glyph": torch.randn(1, 8, d.text_embed_dim, generator=gen(4)),
                "prior_token_id": torch.randint(0, d.prior_vq_quantizer_codebook_size, (1, n), generator=gen(5)),
                "prior_token_drop": torch.zeros(1, n, dtype=torch.bool), "timestep": torch.full((1,), 500.0),
                "target_size": torch.tensor([[float(size), float(size)]]), "crop_coords": torch.zeros(1, 2)}

    return [
        Component("ar", lambda: _seeded(lambda: _ar_language_only(TextModel, cfg.ar), 0), ar_inputs,
                  ar_run),
        Component("vision", lambda: _seeded(lambda: VisionEncoder(cfg.ar.vision), 0), vision_inputs,
                  lambda m, x: m(x["pixels"])),
        Component("glyph", lambda: _seeded(lambda: GlyphEncoder(cfg.glyph), 0),
                  lambda: {"ids": torch.randint(3, 259, (1, 64), generator=gen(6))}, lambda m, x: m(x["ids"])),
        Component("dit", lambda: _seeded(lambda: GlmImageDiT(d), 0), dit_inputs, lambda m, x: m(**x)),
        Component("vae", lambda: _seeded(lambda: AutoencoderKL(v), 0),
                  lambda: {"z": torch.randn(1, v.latent_channels, lat, lat, generator=gen(7))},
                  lambda m, x: m.decode(x["z"])),
    ]


def _ar_language_only(text_cls, ar_cfg):
    """The AR's language model and head (what the decode runs); its ViT is the component `vision`."""
    m = torch.nn.Module()
    m.language_model = text_cls(ar_cfg.text)
    m.lm_head = torch.nn.Linear(ar_cfg.text.hidden_size, ar_cfg.text.vision_vocab_size, bias=False)
    return m


def _cast(x: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() and k not in ("timestep", "target_size", "crop_coords")
                else v.to(device)) for k, v in x.items()}


def rel_error(y: torch.Tensor, truth: torch.Tensor) -> float:
    y, truth = y.double().cpu(), truth.double()
    return float((y - truth).norm() / truth.norm().clamp_min(1e-30))


@torch.no_grad()
def check(device=None, dtype=None, preset: str = PRESET, size: int = 256, only: list[str] | None = None) -> list[dict]:
    """One row per component: relative error on (device, dtype) against fp32 on the CPU, and its tolerance."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(dt).removeprefix("torch.")
    rows = []
    for c in components(preset, size):
        if only and c.name not in only:
            continue
        model, x = c.build(), c.inputs()
        truth = c.run(model, x)
        model = model.to(dev, dt)
        if dev.type == "cpu":
            pack_linears(model)  # the layout the CPU pipeline runs (glimage.layouts)
        synchronize(dev)
        t0 = time.perf_counter()
        y = c.run(model, _cast(x, dev, dt))
        synchronize(dev)
        err = rel_error(y, truth)
        tol = TOLERANCES.get(name, {}).get(c.name)
        rows.append({"component": c.name, "device": str(dev), "dtype": name, "rel_error": err, "tolerance": tol,
                     "seconds": time.perf_counter() - t0,
                     "ok": bool(torch.isfinite(y).all()) and (tol is None or err <= tol)})
        del model, truth, y
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'component':10s} {'device':8s} {'dtype':9s} {'rel. error':>11s} {'tolerance':>10s}  result"]
    for r in rows:
        tol = "-" if not r["tolerance"] else f"{r['tolerance']:.2e}"
        lines.append(f"{r['component']:10s} {r['device']:8s} {r['dtype']:9s} {r['rel_error']:11.2e} {tol:>10s}  "
                     f"{'ok' if r['ok'] else 'OUT OF TOLERANCE'}")
    return "\n".join(lines)


def main(args) -> int:
    from .device import set_threads
    set_threads(args.threads)
    if args.size % 32 or not 64 <= args.size <= 1024:
        raise InputError(f"--size {args.size} must be a multiple of 32 in [64, 1024]", "size")
    rows = check(args.device, args.dtype, args.preset, args.size, args.only)
    print(format_rows(rows))
    if args.measure:
        print("tolerances (1.25x):", json.dumps({r["component"]: float(f"{1.25 * r['rel_error']:.2e}") for r in rows}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


def add_parser(sub, parents=()) -> None:
    p = sub.add_parser("check", parents=list(parents), help="conformance of a device and dtype: each component at the "
                       "official widths against fp32 on the CPU (exit 1 when out of tolerance)")
    p.add_argument("--preset", default=PRESET, help="widths to check at (default slice: the official ones)")
    p.add_argument("--size", type=int, default=256, help="image side the inputs stand for (default 256)")
    p.add_argument("--only", nargs="+", choices=("ar", "vision", "glyph", "dit", "vae"), help="these components only")
    p.add_argument("--measure", action="store_true", help="also print 1.25x each error: the tolerances' source")
    p.add_argument("--json", default=None, help="also write the rows here")
    from .cliargs import device_args
    device_args(p)
    p.set_defaults(fn=main)
