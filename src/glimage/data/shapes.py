"""The `shapes` synthetic captioned dataset: coloured shapes and text signs on a white 128x128 canvas.

It is small enough to train every tiny stage in minutes and structured enough to check a model automatically:
each image is drawn from a caption template, and `metadata.jsonl` keeps, next to `file_name`/`text`, the exact
annotations an automatic checker needs (object colour, shape, bbox, centre; the template; the sign's word).

Captions, one template per image, assigned round robin (`TEMPLATES[i % 6]`) so they are balanced exactly:
  single      `a {color} {shape}`                                  one object anywhere
  left_right  `a {color} {shape} on the {left|right}`              one object inside that half
  top_bottom  `a {color} {shape} at the {top|bottom}`              one object inside that half
  left_of     `a {color} {shape} to the left of a {color} {shape}` first object's bbox ends left of the second's
  above       `a {color} {shape} above a {color} {shape}`          first object's bbox ends above the second's
  sign        `a sign that says "{WORD}"`                          3-4 letters A-Z, dark on a light board, centred (see CELL_W)
Relations are unambiguous: the boxes are separated along the named axis and the centres are further apart along
that axis than across it; the two objects of one image always differ in colour or shape.

Held out of training (compositional generalisation): every image containing a green triangle or a yellow circle.
The train split never draws them; the eval split is a differently seeded set that draws all 18 colour/shape pairs
and forces a held-out pair as the first object of the images of every third block of six (i // 6 % 3 == 0).

Determinism: image i is drawn from its own `random.Random` seeded by a string of (split, seed, i) (string seeds
are hashed with SHA-512, so this does not depend on PYTHONHASHSEED), so a set of n images is a prefix of a set of
n + k images with the same seed and split. Shapes are drawn without anti-aliasing, so each object is made of
exactly its palette colour (only the sign's text edges are anti-aliased, in grey).

Boxes are `[x0, y0, x1, y1]` in pixels with exclusive ends (the object covers x0 <= x < x1).
"""

from __future__ import annotations

import colorsys
import functools
import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..validate import InputError

SIZE = 128
BACKGROUND = (255, 255, 255)
# Saturated palette colours with hues >= 25 degrees apart (red 0, orange 27, yellow 55, green 129, blue 229,
# purple 285): a checker can classify a blob by nearest hue.
COLORS = {
    "red": (220, 20, 20),
    "orange": (255, 115, 0),
    "yellow": (235, 215, 0),
    "green": (20, 160, 40),
    "blue": (20, 60, 230),
    "purple": (150, 30, 190),
}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("single", "left_right", "top_bottom", "left_of", "above", "sign")
HELD_OUT = frozenset({("green", "triangle"), ("yellow", "circle")})
SPLITS = ("train", "eval")
MIN_OBJ, MAX_OBJ = 28, 48  # object size across, px
MARGIN = 2  # objects stay this far from the border
GAP = 6  # minimal distance between two objects' boxes
# The sign: neutral greys so that no part of a sign can be mistaken for a coloured object.
BOARD, BOARD_EDGE, POST, INK = (228, 228, 228), (70, 70, 70), (130, 130, 130), (20, 20, 20)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EVAL_CATEGORIES = ("single", "positioned", "relation", "text", "held_out")


def _pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return pairs if split == "eval" else [p for p in pairs if p not in HELD_OUT]


def _disjoint(a: list[int], b: list[int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _box(rng: random.Random, size: int, region: tuple[int, int, int, int]) -> list[int]:
    x = rng.randint(region[0], region[2] - size)
    y = rng.randint(region[1], region[3] - size)
    return [x, y, x + size, y + size]


def _object(color: str, shape: str, box: list[int]) -> dict:
    return {"color": color, "shape": shape, "bbox": box, "center": [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]}


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict) -> None:
    x0, y0, x1, y1 = obj["bbox"]
    fill = COLORS[obj["color"]]
    # PIL's shape boxes include their end pixel: pass x1 - 1 so the drawn object covers exactly [x0, x1).
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:  # upward isosceles triangle filling its box; its box centre lies inside it
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def _article(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _caption(template: str, objects: list[dict], position: str | None, word: str | None) -> str:
    if template == "sign":
        return f'a sign that says "{word}"'
    first = _article(objects[0]["color"], objects[0]["shape"])
    if template == "single":
        return first
    if template == "left_right":
        return f"{first} on the {position}"
    if template == "top_bottom":
        return f"{first} at the {position}"
    second = _article(objects[1]["color"], objects[1]["shape"])
    return f"{first} to the left of {second}" if template == "left_of" else f"{first} above {second}"


# The sign's letters sit in fixed cells aligned to the 16 px grid of the tokenizer (one token column and two
# token rows per letter): a token then holds one half of one letter, not pieces of two letters at an offset
# set by the widths of the letters before it, so 52 codes can say every letter and the AR writes letter k of the
# word into column c0 + k. The word starts at column (8 - n) // 2: centred for 4 letters, 8 px left of
# centre for 3.
CELL_W, CELL_H, TEXT_ROW = 16, 32, 48  # cell size and the text band's top, px


@functools.lru_cache(maxsize=1)
def _cell_font():
    """Pillow's embedded scalable font (Aileron) at the largest size whose capitals fit a cell's height."""
    for size in range(CELL_H + 12, 7, -1):
        font = ImageFont.load_default(size=size)
        boxes = [font.getbbox(c, stroke_width=1) for c in LETTERS]
        top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
        if bottom - top <= CELL_H - 4:
            return font, top, bottom
    raise RuntimeError("no font size fits the sign's cells")


def _text_mask(word: str) -> Image.Image:
    """The word as an 'L' mask (255 = ink), one CELL_W-wide cell per letter; wide letters are squeezed."""
    try:
        font, top, bottom = _cell_font()
    except (TypeError, ImportError, OSError) as e:
        raise RuntimeError("the shapes signs need Pillow >= 10.1 with FreeType (its embedded scalable font)") from e
    h = bottom - top
    mask = Image.new("L", (len(word) * CELL_W, h), 0)
    for k, c in enumerate(word):
        # stroke 1: the regular weight turns thin at 128 px; a bolder stroke survives VAE/VQ downsampling
        x0, _, x1, _ = font.getbbox(c, stroke_width=1)
        glyph = Image.new("L", (x1 - x0, h), 0)
        ImageDraw.Draw(glyph).text((-x0, -top), c, font=font, fill=255, stroke_width=1, stroke_fill=255)
        if glyph.width > CELL_W - 2:  # M, W: keep a gap between neighbours
            glyph = glyph.resize((CELL_W - 2, h), Image.Resampling.LANCZOS)
        mask.paste(glyph, (k * CELL_W + (CELL_W - glyph.width) // 2, 0))
    return mask


def _draw_sign(image: Image.Image, word: str) -> dict:
    mask = _text_mask(word)
    pad = 8
    c0 = (SIZE // CELL_W - len(word)) // 2
    x0, x1 = c0 * CELL_W, (c0 + len(word)) * CELL_W
    board = [x0 - pad, TEXT_ROW - pad, x1 + pad, TEXT_ROW + CELL_H + pad]
    draw = ImageDraw.Draw(image)
    cx = (board[0] + board[2]) // 2
    draw.rectangle([cx - 4, board[3], cx + 3, SIZE - 1], fill=POST)
    draw.rectangle([board[0], board[1], board[2] - 1, board[3] - 1], fill=BOARD, outline=BOARD_EDGE, width=2)
    tx, ty = x0, TEXT_ROW + (CELL_H - mask.height) // 2
    image.paste(Image.new("RGB", mask.size, INK), (tx, ty), mask)
    return {"board": board, "text_bbox": [tx, ty, tx + mask.width, ty + mask.height]}


def _place_relation(rng: random.Random, sizes: tuple[int, int], template: str) -> tuple[list[int], list[int]]:
    full = (MARGIN, MARGIN, SIZE - MARGIN, SIZE - MARGIN)
    axis = 0 if template == "left_of" else 1  # 0: x (left_of), 1: y (above)
    while True:  # rejection sampling; about one draw in five is accepted
        a, b = _box(rng, sizes[0], full), _box(rng, sizes[1], full)
        along = (b[axis] + b[axis + 2] - a[axis] - a[axis + 2]) / 2
        across = abs((b[1 - axis] + b[3 - axis] - a[1 - axis] - a[3 - axis]) / 2)
        if a[axis + 2] + GAP <= b[axis] and along > across:
            return a, b


def render_sample(split: str, seed: int, index: int) -> tuple[Image.Image, dict]:
    """Image `index` of the (split, seed) set and its metadata record (without `file_name`)."""
    rng = random.Random(f"glimage-shapes:{split}:{seed}:{index}")
    template = TEMPLATES[index % len(TEMPLATES)]
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    record = {"template": template, "objects": [], "position": None, "word": None}
    if template == "sign":
        record["word"] = "".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 4))))
        record.update(_draw_sign(image, record["word"]))
    else:
        pairs = _pairs(split)
        first = rng.choice(pairs)
        if split == "eval" and (index // len(TEMPLATES)) % 3 == 0:
            first = rng.choice(sorted(HELD_OUT))
        n_obj = 2 if template in ("left_of", "above") else 1
        chosen = [first] + [rng.choice([p for p in pairs if p != first]) for _ in range(n_obj - 1)]
        sizes = tuple(rng.randint(MIN_OBJ, MAX_OBJ) for _ in chosen)
        half = SIZE // 2
        if template == "single":
            boxes = [_box(rng, sizes[0], (MARGIN, MARGIN, SIZE - MARGIN, SIZE - MARGIN))]
        elif template == "left_right":
            record["position"] = rng.choice(("left", "right"))
            x0 = MARGIN if record["position"] == "left" else half
            boxes = [_box(rng, sizes[0], (x0, MARGIN, x0 + half - MARGIN, SIZE - MARGIN))]
        elif template == "top_bottom":
            record["position"] = rng.choice(("top", "bottom"))
            y0 = MARGIN if record["position"] == "top" else half
            boxes = [_box(rng, sizes[0], (MARGIN, y0, SIZE - MARGIN, y0 + half - MARGIN))]
        else:
            boxes = list(_place_relation(rng, sizes, template))
        draw = ImageDraw.Draw(image)
        for (color, shape), box in zip(chosen, boxes):
            obj = _object(color, shape, box)
            _draw_object(draw, obj)
            record["objects"].append(obj)
    record["text"] = _caption(template, record["objects"], record["position"], record["word"])
    record.update(split=split, seed=seed, index=index, width=SIZE, height=SIZE)
    return image, record


def _check_args(n: int, seed: int, split: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n={n!r} must be an integer >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r} must be an integer >= 0")
    if split not in SPLITS:
        raise InputError(f"split={split!r} must be one of {SPLITS}")


def generate_shapes(out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Write n images `{index:06d}.png` and `metadata.jsonl` (written last, atomically) into out_dir.

    Returns the metadata records: `file_name`, `text`, `template`, `objects` ([{color, shape, bbox, center}]),
    `position` (left/right/top/bottom or None), `word` (sign templates), `board`/`text_bbox` (signs),
    `split`, `seed`, `index`, `width`, `height`.
    """
    _check_args(n, seed, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, record = render_sample(split, seed, i)
        record = {"file_name": f"{i:06d}.png", "text": record.pop("text"), **record}
        image.save(out / record["file_name"], compress_level=1)  # fast; PNG stays lossless
        records.append(record)
    tmp = out / f"metadata.jsonl.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, out / "metadata.jsonl")
    return records


def hue_degrees(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360


# ---- evaluation prompts: a fixed seeded set, separate from any training caption stream ----

def _spec(rng: random.Random, template: str, pairs: list, held_out: bool) -> dict:
    first = rng.choice(sorted(HELD_OUT)) if held_out else rng.choice(pairs)
    objects = [first]
    if template in ("left_of", "above"):
        objects.append(rng.choice([p for p in _pairs("eval" if held_out else "train") if p != first]))
        if held_out and rng.random() < 0.5:  # the held-out object on either side of the relation
            objects.reverse()
    position = None
    if template == "left_right":
        position = rng.choice(("left", "right"))
    elif template == "top_bottom":
        position = rng.choice(("top", "bottom"))
    objs = [{"color": c, "shape": s} for c, s in objects]
    return {"template": template, "objects": objs, "position": position, "word": None,
            "prompt": _caption(template, objs, position, None)}


def eval_prompts(seed: int = 0, n_per_category: int = 8) -> list[dict]:
    """A fixed seeded evaluation set: n_per_category prompts for each of EVAL_CATEGORIES.

    single / positioned / relation use only training pairs (in-distribution composition); `text` are signs with
    words drawn from their own seeded stream; `held_out` are object templates that contain a green triangle or a
    yellow circle. Each item: {category, prompt, template, objects: [{color, shape}], position, word}. Prompts
    are distinct within a category while the category has enough distinct prompts (`single` has 16), then repeat.
    """
    _check_args(n_per_category, seed, "eval")
    train_pairs = _pairs("train")
    object_templates = ("single", "left_right", "top_bottom", "left_of", "above")
    samplers = {
        "single": lambda r: _spec(r, "single", train_pairs, False),
        "positioned": lambda r: _spec(r, r.choice(("left_right", "top_bottom")), train_pairs, False),
        "relation": lambda r: _spec(r, r.choice(("left_of", "above")), train_pairs, False),
        "text": lambda r: _sign_spec(r),
        "held_out": lambda r: _spec(r, r.choice(object_templates), train_pairs, True),
    }
    items = []
    for category in EVAL_CATEGORIES:
        rng = random.Random(f"glimage-shapes-eval-prompts:{seed}:{category}")
        found, seen = [], set()
        for _ in range(50 * n_per_category):
            if len(found) == n_per_category:
                break
            spec = samplers[category](rng)
            if spec["prompt"] not in seen:
                seen.add(spec["prompt"])
                found.append(spec)
        found = [found[i % len(found)] for i in range(n_per_category)]
        items += [{"category": category, **spec} for spec in found]
    return items


def _sign_spec(rng: random.Random) -> dict:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.choice((3, 4))))
    return {"template": "sign", "objects": [], "position": None, "word": word,
            "prompt": _caption("sign", [], None, word)}
