"""Before/after grid of two `glimage eval shapes --out` folders of the same prompt set (docs/rl.md):
for each category, the first N prompts, one row per model, crops of each folder's samples.png.

python scripts/rl_grid.py BEFORE_DIR AFTER_DIR OUT.png [--n 8] [--categories relation text single]"""

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw


def tiles(folder: Path) -> tuple[list[Image.Image], list[dict]]:
    sheet = Image.open(folder / "samples.png").convert("RGB")
    specs = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]
    side = sheet.width // 8  # evaluate() writes 8 columns
    return [sheet.crop(((i % 8) * side, (i // 8) * side, (i % 8 + 1) * side, (i // 8 + 1) * side))
            for i in range(len(specs))], specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--categories", nargs="+", default=["relation", "positioned", "text"])
    args = p.parse_args()
    (a, specs), (b, specs_b) = tiles(Path(args.before)), tiles(Path(args.after))
    if [s["prompt"] for s in specs] != [s["prompt"] for s in specs_b]:
        raise SystemExit("the two folders hold different prompt sets")
    side, label = a[0].width, 74
    rows = []
    for cat in args.categories:
        idx = [i for i, s in enumerate(specs) if s["category"] == cat][:args.n]
        rows += [(f"{cat}\nbefore", [(a[i], specs[i]["ok"]) for i in idx]),
                 (f"{cat}\nafter", [(b[i], specs_b[i]["ok"]) for i in idx])]
    grid = Image.new("RGB", (label + args.n * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, ims) in enumerate(rows):
        draw.multiline_text((4, r * side + side // 2 - 12), name, fill="black")
        for c, (im, ok) in enumerate(ims):
            x, y = label + c * side, r * side
            grid.paste(im, (x, y))
            draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(0, 160, 0) if ok else (200, 0, 0), width=3)
    grid.save(args.out)
    print(f"{args.out}: {len(rows)} rows; green frame = the checker passes, red = it fails")


if __name__ == "__main__":
    main()
