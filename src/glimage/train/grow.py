"""Depth up-scaling of a trained AR: insert new GLM-4 decoder layers that start as the identity.

`python -m glimage.train.grow BASE OUT --after 1 3`

Each new layer is a copy of the layer it follows, with its two sandwich post-norms (`post_self_attn_layernorm`,
`post_mlp_layernorm`) set to zero: a GLM-4 layer computes x + post_norm(attn(...)) + post_norm(mlp(...)), so a
zero post-norm weight makes both branches vanish and the grown model computes exactly what BASE does. Training
then opens the new layers from there (their post-norm weights get gradient at once; the copied weights are a
better start than random ones, as in depth up-scaling of LLMs). Zeroing o_proj / down_proj instead would feed
an all-zero vector to the RMSNorm, whose gradient there is scaled by 1/sqrt(eps).

Used for the README's 6-layer AR experiment (the shipped 4-layer AR grown after layers 1 and 3, then 3000 steps);
that model was not shipped.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import read_json, read_state_dict, save_state_dict, write_json
from ..validate import InputError

LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
ZEROED = ("post_self_attn_layernorm.weight", "post_mlp_layernorm.weight")


def grow_layers(state_dict: dict[str, torch.Tensor], n_layers: int,
                after: list[int]) -> dict[str, torch.Tensor]:
    """The AR state dict with one identity layer inserted after each index in `after` (0 <= i < n_layers)."""
    bad = sorted(i for i in after if not 0 <= i < n_layers)
    if bad or len(set(after)) != len(after):
        raise InputError(f"--after {after}: layer indices must be distinct and in 0..{n_layers - 1}")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        m = LAYER.match(key)
        if m:
            layers.setdefault(int(m[1]), {})[m[2]] = value
        else:
            out[key] = value
    if sorted(layers) != list(range(n_layers)):
        raise InputError(f"the state dict has layers {sorted(layers)}, the config says {n_layers}")
    order = [(i, grown) for i in range(n_layers) for grown in ((False, True) if i in after else (False,))]
    for j, (i, grown) in enumerate(order):
        for name, value in layers[i].items():
            value = value.clone()
            if grown and name in ZEROED:
                value.zero_()
            out[f"model.language_model.layers.{j}.{name}"] = value
    return out


def grow_folder(base: str | Path, out: str | Path, after: list[int]) -> int:
    """Copy the model folder `base` to the new folder `out` with its AR grown; returns the new layer count."""
    base, out = Path(base), Path(out)
    if not (base / "vision_language_encoder").is_dir():
        raise InputError(f"{base} is not a GLM-Image folder (no vision_language_encoder/)")
    if out.exists():
        raise InputError(f"{out} exists; name a new folder (nothing is overwritten)")
    cfg = read_json(base / "vision_language_encoder" / "config.json")
    n = cfg["text_config"]["num_hidden_layers"]
    sd = grow_layers(read_state_dict(base / "vision_language_encoder"), n, after)  # checked before writing
    shutil.copytree(base, out)
    part = out / "vision_language_encoder"
    for f in part.glob("*.safetensors*"):
        f.unlink()
    save_state_dict(sd, part, "model.safetensors")
    cfg["text_config"]["num_hidden_layers"] = n + len(after)
    write_json(part / "config.json", cfg)
    return n + len(after)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glimage.train.grow", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="model folder whose AR is grown")
    p.add_argument("out", help="new model folder")
    p.add_argument("--after", type=int, nargs="+", required=True, help="insert a new layer after these layers")
    args = p.parse_args(argv)
    try:
        n = grow_folder(args.base, args.out, args.after)
    except (ValueError, FileNotFoundError) as e:
        print(f"grow: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: AR with {n} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
