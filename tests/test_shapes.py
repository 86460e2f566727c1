"""The `shapes` synthetic dataset: determinism, the held-out rule, balanced templates, geometry, colours, signs,
the evaluation prompt set and the `glimage data shapes` command."""

import itertools
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from glimage.data.shapes import (CELL_W, COLORS, EVAL_CATEGORIES, HELD_OUT, SHAPES, SIZE, TEMPLATES, eval_prompts,
                                 generate_shapes, hue_degrees, render_sample)

CAPTION = {
    "single": r"a (\w+) (\w+)",
    "left_right": r"a (\w+) (\w+) on the (left|right)",
    "top_bottom": r"a (\w+) (\w+) at the (top|bottom)",
    "left_of": r"a (\w+) (\w+) to the left of a (\w+) (\w+)",
    "above": r"a (\w+) (\w+) above a (\w+) (\w+)",
    "sign": r'a sign that says "([A-Z]{3,4})"',
}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_train")
    return out, generate_shapes(out, 600, seed=3, split="train")


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_eval")
    return out, generate_shapes(out, 120, seed=3, split="eval")


def _pixels(root, record):
    return np.asarray(Image.open(root / record["file_name"]).convert("RGB"))


def _pairs(record):
    return {(o["color"], o["shape"]) for o in record["objects"]}


def test_deterministic_and_seeded(tmp_path):
    a = generate_shapes(tmp_path / "a", 24, seed=7)
    b = generate_shapes(tmp_path / "b", 24, seed=7)
    assert a == b
    assert (tmp_path / "a" / "metadata.jsonl").read_text() == (tmp_path / "b" / "metadata.jsonl").read_text()
    for r in a:
        assert np.array_equal(_pixels(tmp_path / "a", r), _pixels(tmp_path / "b", r))
    # a set is a prefix of a larger one; other seeds and the eval split are different sets
    assert generate_shapes(tmp_path / "c", 30, seed=7)[:24] == a
    other = generate_shapes(tmp_path / "d", 24, seed=8)
    assert sum(x["text"] != y["text"] for x, y in zip(a, other)) > 12
    ev = generate_shapes(tmp_path / "e", 24, seed=7, split="eval")
    assert sum(x["text"] != y["text"] for x, y in zip(a, ev)) > 12


def test_held_out_pairs_only_in_eval(train_set, eval_set):
    train, evl = train_set[1], eval_set[1]
    seen_train = set().union(*(_pairs(r) for r in train))
    seen_eval = set().union(*(_pairs(r) for r in evl))
    assert not seen_train & HELD_OUT
    assert seen_train == {(c, s) for c in COLORS for s in SHAPES} - HELD_OUT  # every other pair is trained on
    assert HELD_OUT <= seen_eval
    assert sum(bool(_pairs(r) & HELD_OUT) for r in evl) >= len(evl) // 5
    for r in train:  # the captions agree: no held-out phrase ever appears in a training caption
        assert "green triangle" not in r["text"] and "yellow circle" not in r["text"]


def test_templates_balanced_and_captions_match(train_set):
    records = train_set[1]
    counts = {t: sum(r["template"] == t for r in records) for t in TEMPLATES}
    assert set(counts.values()) == {len(records) // len(TEMPLATES)}
    for r in records:
        m = re.fullmatch(CAPTION[r["template"]], r["text"])
        assert m, r["text"]
        if r["template"] == "sign":
            assert m.group(1) == r["word"]
            continue
        expected = tuple(x for o in r["objects"] for x in (o["color"], o["shape"]))
        assert m.groups() == expected + ((r["position"],) if r["position"] else ())
        assert len(r["objects"]) == (2 if r["template"] in ("left_of", "above") else 1)
        assert (r["position"] is not None) == (r["template"] in ("left_right", "top_bottom"))


def test_geometry_and_pixels(train_set):
    root, records = train_set
    for r in records:
        pix = _pixels(root, r)
        outside = np.ones((SIZE, SIZE), bool)
        for o in r["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert x1 - x0 == y1 - y0 and 28 <= x1 - x0 <= 48
            assert o["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            color = np.array(COLORS[o["color"]])
            inside = (pix[y0:y1, x0:x1] == color).all(-1)
            # the drawn shape fills its box as the shape says: circle pi/4, square 1, triangle 1/2
            fill = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[o["shape"]]
            assert inside.mean() == pytest.approx(fill, abs=0.06), (r["text"], inside.mean())
            cy, cx = int(o["center"][1]), int(o["center"][0])
            assert (pix[cy, cx] == color).all()
            outside[y0:y1, x0:x1] = False
            if r["template"] == "left_right":
                assert (x1 <= SIZE // 2) if r["position"] == "left" else (x0 >= SIZE // 2)
            if r["template"] == "top_bottom":
                assert (y1 <= SIZE // 2) if r["position"] == "top" else (y0 >= SIZE // 2)
        if r["template"] == "sign":
            continue
        assert (pix[outside] == 255).all(), r["text"]  # nothing drawn outside the objects' boxes
        if len(r["objects"]) == 2:
            a, b = r["objects"]
            assert (a["color"], a["shape"]) != (b["color"], b["shape"])
            ax = 0 if r["template"] == "left_of" else 1  # first object strictly left of / above the second
            assert a["bbox"][ax + 2] < b["bbox"][ax]
            along = b["center"][ax] - a["center"][ax]
            assert along > abs(b["center"][1 - ax] - a["center"][1 - ax])
            ba, bb = a["bbox"], b["bbox"]
            assert ba[2] <= bb[0] or bb[2] <= ba[0] or ba[3] <= bb[1] or bb[3] <= ba[1]  # disjoint


def test_palette_hues_distinct():
    hues = {name: hue_degrees(rgb) for name, rgb in COLORS.items()}
    for (a, ha), (b, hb) in itertools.combinations(hues.items(), 2):
        d = abs(ha - hb)
        assert min(d, 360 - d) >= 25, (a, b, ha, hb)
    for name, rgb in COLORS.items():
        lo, hi = min(rgb), max(rgb)
        assert (hi - lo) / hi >= 0.8, name  # saturated: never confused with the white/grey background or sign


def test_signs_legible(train_set):
    root, records = train_set
    signs = [r for r in records if r["template"] == "sign"]
    assert {len(r["word"]) for r in signs} == {3, 4}
    for r in signs[:40]:
        pix = _pixels(root, r).astype(int)
        bx0, by0, bx1, by1 = r["board"]
        tx0, ty0, tx1, ty1 = r["text_bbox"]
        assert 0 <= bx0 <= tx0 < tx1 <= bx1 <= SIZE and 0 <= by0 <= ty0 < ty1 <= by1 <= SIZE
        # centred up to half a token (3-letter words stay on the 16 px grid); one 16 px cell per letter
        assert abs((bx0 + bx1) / 2 - SIZE / 2) <= CELL_W / 2 and abs((by0 + by1) / 2 - SIZE / 2) <= 1
        assert tx0 % 16 == 0 and tx1 - tx0 == CELL_W * len(r["word"])
        assert ty1 - ty0 >= 20  # large: letters about a fifth of the image tall
        ink = pix[ty0:ty1, tx0:tx1].max(-1) < 80
        assert 0.15 < ink.mean() < 0.7  # dark letters on a light board
        assert pix[by0 + 3:ty0, bx0 + 3:bx1 - 3].min() > 200  # light board around the text
        # no colour anywhere: neutral greys only, so a sign never looks like a coloured object
        assert (pix.max(-1) - pix.min(-1)).max() <= 2
    # different words draw different pixels
    a, b = signs[0], next(s for s in signs if s["word"] != signs[0]["word"])
    assert not np.array_equal(_pixels(root, a), _pixels(root, b))


def test_eval_prompts():
    items = eval_prompts(seed=1, n_per_category=10)
    assert items == eval_prompts(seed=1, n_per_category=10)
    assert items != eval_prompts(seed=2, n_per_category=10)
    by = {c: [i for i in items if i["category"] == c] for c in EVAL_CATEGORIES}
    assert all(len(v) == 10 for v in by.values())
    for c, group in by.items():
        assert len({i["prompt"] for i in group}) == 10  # distinct within a category
        for i in group:
            assert re.fullmatch(CAPTION[i["template"]], i["prompt"]), i["prompt"]
            pairs = {(o["color"], o["shape"]) for o in i["objects"]}
            assert bool(pairs & HELD_OUT) == (c == "held_out")
    assert all(i["template"] == "single" for i in by["single"])
    assert {i["template"] for i in by["positioned"]} <= {"left_right", "top_bottom"}
    assert {i["template"] for i in by["relation"]} <= {"left_of", "above"}
    assert all(re.fullmatch(r"[A-Z]{3,4}", i["word"]) for i in by["text"])
    # `single` has only 16 in-distribution prompts: beyond that they repeat rather than fail
    assert len(eval_prompts(0, 20)) == 100
    # the prompts are the generator's own caption templates
    _, rec = render_sample("eval", 1, 0)
    assert re.fullmatch(CAPTION[rec["template"]], rec["text"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        generate_shapes(tmp_path, 4, split="test")
    with pytest.raises(ValueError, match="n=0"):
        generate_shapes(tmp_path, 0)
    with pytest.raises(ValueError, match="seed=-1"):
        generate_shapes(tmp_path, 4, seed=-1)


def test_cli(tmp_path, capsys):
    from glimage.cli import main

    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--n", "12", "--seed", "5", "--split", "eval"]) == 0
    lines = (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert records == generate_shapes(tmp_path / "t", 12, seed=5, split="eval")
    assert all((tmp_path / "s" / r["file_name"]).is_file() for r in records)
    assert "12 eval images" in capsys.readouterr().out
    assert main(["data", "shapes", "--out", str(tmp_path / "u"), "--n", "0"]) == 2
    assert "n=0" in capsys.readouterr().err
