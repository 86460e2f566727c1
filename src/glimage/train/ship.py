"""Assemble a model folder from the exports of a stage chain, and store it compactly for shipping.

`python -m glimage.train.ship --ar runs/shapes-ar/export --decoder runs/shapes-decoder/export
    [--vae runs/shapes-vae-decoder/export] --out DIR`

The decoder stage reads only the VAE, the glyph encoder and the VQ tokenizer from its base, so it can train
concurrently with the AR from the tokenizer's export (the shapes chain does). Its export is then complete but
for the AR's language model: this takes `vision_language_encoder/` from the AR export and everything else from
the decoder export, after checking that both were trained on the same tokenizer (identical `visual.*` and
`vqmodel.*` tensors), since a DiT conditioned on one codebook cannot decode another's ids.

`--dtype float16` stores the weights in half precision (the shipped default model: half the bytes); loading
casts them back to the pipeline's dtype. The folder's generation defaults (`glimage.json`: height, width,
num_inference_steps, guidance_scale), which the pipeline uses when a call leaves them unset, are those the
decoder's export recorded (its recipe's image_size, sample_steps, sample_guidance); `--defaults KEY=VALUE ...`
overrides some of them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import read_json, read_state_dict, save_state_dict, weight_files, write_json
from ..device import DTYPES
from ..validate import InputError

DEFAULT_KEYS = {"height": int, "width": int, "num_inference_steps": int, "guidance_scale": float}
TOKENIZER_PREFIXES = ("model.visual.", "model.vqmodel.")


def assemble(ar: str | Path, decoder: str | Path, out: str | Path, vae: str | Path | None = None) -> Path:
    """ar's vision_language_encoder/ + processor/, decoder's other components; vae/ from `vae` if given (a
    decoder-only fine-tune of the VAE the DiT was trained on: its encoder and latent statistics must match)."""
    ar, decoder, out = Path(ar), Path(decoder), Path(out)
    for folder in (ar, decoder):
        if not (folder / "vision_language_encoder").is_dir():
            raise InputError(f"{folder} is not a GLM-Image folder (no vision_language_encoder/)")
    a = read_state_dict(ar / "vision_language_encoder", prefixes=TOKENIZER_PREFIXES)
    d = read_state_dict(decoder / "vision_language_encoder", prefixes=TOKENIZER_PREFIXES)
    differ = sorted(k for k in a.keys() | d.keys() if k not in a or k not in d or not torch.equal(a[k], d[k]))
    if differ:
        raise InputError(f"{ar} and {decoder} were trained on different VQ tokenizers ({len(differ)} tensors "
                         f"differ, e.g. {differ[0]}); train both stages from the same tokenizer export")
    if vae is not None:
        _check_same_latents(Path(vae), decoder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(decoder, tmp)
    shutil.rmtree(tmp / "vision_language_encoder")
    shutil.copytree(ar / "vision_language_encoder", tmp / "vision_language_encoder")
    shutil.copytree(ar / "processor", tmp / "processor", dirs_exist_ok=True)
    if vae is not None:
        shutil.rmtree(tmp / "vae")
        shutil.copytree(Path(vae) / "vae", tmp / "vae")
    _replace(tmp, out)
    return out


def _check_same_latents(vae: Path, decoder: Path) -> None:
    a = read_state_dict(vae / "vae", prefixes=("encoder.",))
    b = read_state_dict(decoder / "vae", prefixes=("encoder.",))
    stats = [{k: read_json(f / "vae" / "config.json").get(k) for k in ("latents_mean", "latents_std")}
             for f in (vae, decoder)]
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a) or stats[0] != stats[1]:
        raise InputError(f"the VAE of {vae} does not share the encoder and latent statistics of {decoder}'s, "
                         "which its DiT was trained on (fine-tune the VAE with freeze_encoder = true)")


def cast_folder(folder: str | Path, dtype: torch.dtype) -> None:
    """Rewrite every component's weights in `dtype` (floating tensors only), in place."""
    for component in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = weight_files(component) if any(component.glob("*.safetensors")) else []
        if not files:
            continue
        sd = read_state_dict(component, dtype=dtype)
        names = {f.name for f in files}
        name = next(iter(names)) if len(names) == 1 else "model.safetensors"
        for f in component.glob("*.safetensors*"):
            f.unlink()
        save_state_dict(sd, component, name)


def write_defaults(folder: str | Path, pairs: list[str]) -> dict:
    """Set some of the folder's generation defaults; the others keep what its export recorded."""
    path = Path(folder) / "glimage.json"
    defaults = read_json(path) if path.is_file() else {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in DEFAULT_KEYS:
            raise InputError(f"unknown default {key!r}; allowed: {sorted(DEFAULT_KEYS)}")
        defaults[key] = DEFAULT_KEYS[key](value)
    write_json(Path(folder) / "glimage.json", defaults)
    return defaults


def _replace(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glimage.train.ship", description=__doc__.split("\n\n")[0])
    p.add_argument("--ar", required=True, help="export of the ar stage")
    p.add_argument("--decoder", required=True, help="export of the decoder stage")
    p.add_argument("--vae", default=None, help="take vae/ from this folder (a decoder-only VAE fine-tune)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--defaults", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        out = assemble(args.ar, args.decoder, args.out, args.vae)
        cast_folder(out, DTYPES[args.dtype])
        if args.defaults:
            write_defaults(out, args.defaults)
    except (ValueError, FileNotFoundError) as e:
        print(f"ship: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
