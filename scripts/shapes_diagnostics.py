"""Where a shapes model loses accuracy (the measurements quoted in the README's default-model section).

  python scripts/shapes_diagnostics.py [MODEL] [--n 40]

gt-prior: DiT + VAE alone -- the tokenizer's ids of the eval split's own images replace the AR's tokens, and
          the checker scores the images, per template, images with a held-out pair apart (an upper bound the AR
          cannot beat).
glyph:    whether the DiT reads the quoted word -- for eval signs, DiT + VAE on the ground truth's ids, drawn
          once with the caption's word and once with another word of the same length (same seed): the mean
          change of the pixels on the text (0-255), beside the change another seed makes with the same word,
          and the letters Tesseract reads in each.
purity:   how well the tokenizer's codes keep colour -- over 16 px patches of training images that hold part of
          an object (>= 20 non-white pixels), how often a patch's palette colour is its code's most common one.
held-out codes: the same for eval images' object patches, seen pairs apart from held-out ones (green triangles,
          yellow circles), with the code's most common colour and object shape over 600 training images.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import numpy as np
import torch

from glimage.data.shapes import COLORS, HELD_OUT, render_sample
from glimage.eval.shapes import check, read_sign
from glimage.pipeline import GlmImagePipeline
from glimage.prior import upsample_ids
from glimage.train.stages.common import normalize_pil


def vq_ids(pipe, image) -> torch.Tensor:
    """(gh, gw) tokenizer ids of a 128 px image, with the pipeline's own preprocessing."""
    px = normalize_pil(image, 128, 128)[None]
    ids, _, _ = pipe.ar.vqmodel.encode(pipe.ar.visual(px))
    side = 128 // pipe.ar.cfg.grid_factor
    return ids.reshape(side, side)


def gt_ids(pipe, image) -> torch.Tensor:
    """The ground truth's ids as the DiT takes them (`prior_token_ids`): (1, 4 * gh * gw)."""
    ids = vq_ids(pipe, image)
    return upsample_ids(ids.reshape(1, -1), *ids.shape)


@torch.no_grad()
def gt_prior(pipe, n: int) -> dict[str, list[int]]:
    scores: dict[str, list[int]] = {}
    for i in range(n):
        image, rec = render_sample("eval", 0, i)
        ok, _ = check(pipe(rec["text"], seed=i, prior_token_ids=gt_ids(pipe, image)).images[0], rec)
        held = any((o["color"], o["shape"]) in HELD_OUT for o in rec["objects"])
        s = scores.setdefault("held_out" if held else rec["template"], [0, 0])
        s[0], s[1] = s[0] + ok, s[1] + 1
    return scores


def text_change(a, b, box) -> float:
    """Mean absolute difference (0-255) of two images over the box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float))[y0:y1, x0:x1].mean())


@torch.no_grad()
def glyph_effect(pipe, n: int) -> tuple[float, float, list[tuple[str, str, str, str]]]:
    changes, noise, reads = [], [], []
    signs = (r for r in (render_sample("eval", 0, i) for i in range(10 * n)) if r[1]["template"] == "sign")
    for k, (image, rec) in zip(range(n), signs):
        ids = gt_ids(pipe, image)
        other = "".join(chr(65 + (ord(c) - 65 + 13) % 26) for c in rec["word"])  # ROT13: every letter differs
        a, b = (pipe(f'a sign that says "{w}"', seed=k, prior_token_ids=ids).images[0] for w in (rec["word"], other))
        c = pipe(rec["text"], seed=k + 1000, prior_token_ids=ids).images[0]
        changes.append(text_change(a, b, rec["text_bbox"]))
        noise.append(text_change(a, c, rec["text_bbox"]))
        reads.append((rec["word"], read_sign(a), other, read_sign(b)))
    return float(np.mean(changes)), float(np.mean(noise)), reads


def _patches(pipe, image, rec):
    """Per 16 px patch: (code, palette colour of an object patch (>= 20 non-white pixels) or None, shape of the
    record's one object of that colour or None)."""
    palette, names = np.array(list(COLORS.values())), list(COLORS)
    a, ids = np.asarray(image).astype(int), vq_ids(pipe, image).numpy()
    p = 128 // ids.shape[0]
    for y, x in np.ndindex(*ids.shape):
        patch = a[y * p:(y + 1) * p, x * p:(x + 1) * p].reshape(-1, 3)
        fg = patch[(patch != 255).any(1)]
        color = shape = None
        if len(fg) >= 20:
            nearest = ((fg[:, None] - palette[None]) ** 2).sum(-1).argmin(1)
            color = names[np.bincount(nearest, minlength=len(names)).argmax()]
            shapes = [o["shape"] for o in rec["objects"] if o["color"] == color]
            shape = shapes[0] if len(shapes) == 1 else None
        yield int(ids[y, x]), color, shape


@torch.no_grad()
def purity(pipe, n: int) -> tuple[float, int]:
    stats: dict[int, Counter] = defaultdict(Counter)
    used = set()
    for i in range(n):
        image, rec = render_sample("train", 0, i)
        if rec["template"] == "sign":
            continue
        for code, color, _ in _patches(pipe, image, rec):
            used.add(code)
            if color:
                stats[code][color] += 1
    total = sum(sum(c.values()) for c in stats.values())
    return sum(max(c.values()) for c in stats.values()) / total, len(used)


@torch.no_grad()
def held_out_codes(pipe, n_train: int, n_eval: int) -> dict[str, tuple[float, float]]:
    """Per eval object patch (held-out pair or seen pair): is the patch's colour, and its object's shape, the
    most common one under its code over the training images? -> {kind: (colour kept, shape kept)}."""
    colours, shapes = defaultdict(Counter), defaultdict(Counter)
    for i in range(n_train):
        image, rec = render_sample("train", 0, i)
        if rec["template"] != "sign":
            for code, color, shape in _patches(pipe, image, rec):
                if color is None:
                    continue
                colours[code][color] += 1
                if shape:
                    shapes[code][shape] += 1
    hits = defaultdict(lambda: [0, 0, 0, 0])
    for i in range(n_eval):
        image, rec = render_sample("eval", 0, i)
        if rec["template"] == "sign":
            continue
        for code, color, shape in _patches(pipe, image, rec):
            if color is None:
                continue
            h = hits["held_out" if (color, shape) in HELD_OUT else "seen"]
            h[0] += 1
            h[1] += bool(colours[code]) and colours[code].most_common(1)[0][0] == color
            if shape:
                h[2] += 1
                h[3] += bool(shapes[code]) and shapes[code].most_common(1)[0][0] == shape
    return {k: (c / max(n, 1), s / max(ns, 1)) for k, (n, c, ns, s) in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=40, help="eval images for gt-prior (purity reads 300 training images)")
    args = ap.parse_args()
    pipe = GlmImagePipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scores = gt_prior(pipe, args.n)
    print("gt-prior:", {k: f"{a}/{b}" for k, (a, b) in scores.items()},
          f"total {sum(a for a, _ in scores.values())}/{args.n}")
    change, noise, reads = glyph_effect(pipe, max(args.n // 4, 1))
    own, other = sum(r[1] == r[0] for r in reads), sum(r[3] == r[2] for r in reads)
    print(f"glyph: another word changes the text's pixels by {change:.1f} / 255 on average, another seed by "
          f"{noise:.1f}; words read exactly: {own}/{len(reads)} on their own ids, {other}/{len(reads)} on another "
          f"word's ids; (word, read, other word, read):", reads)
    share, used = purity(pipe, 300)
    print(f"purity: {share:.1%} of object patches have their code's most common colour; {used} codes used")
    kept = held_out_codes(pipe, 600, 400)
    print("held-out codes (600 train / 400 eval images; colour kept, shape kept):",
          {k: f"{c:.0%}, {s:.0%}" for k, (c, s) in kept.items()})


if __name__ == "__main__":
    main()
