"""Training data: image-caption folders and tar shards, aspect buckets, the deterministic batch plan.

Sources accepted by `ImageTextDataset(root, ...)`:
  - a folder with `metadata.jsonl`, one JSON object per line: `file_name` (relative to the folder), `text`,
    optional `source_file_names` (list, source images of an editing sample), optional `width`/`height`
    (used for bucketing instead of reading the image header);
  - a directory of `.tar` shards, one `.tar` file, or a glob of them (webdataset convention: members that share
    a key `dir/key.` form a sample: `key.png|jpg|jpeg|webp` the image, `key.txt` the caption or `key.json` with a
    `text` (or `caption`) field, `key.source.png` / `key.source_0.png`, `key.source_1.jpg`, ... the sources).
A bad sample (unreadable or missing image, missing or empty caption, unparsable metadata line) makes
`__getitem__` return None and counts the reason in `dataset.skipped` (a Counter of skip events in this process:
with DataLoader workers the counts stay in the workers, so count the Nones of a batch there instead).
Samples are never dropped from the index, so indices, buckets and the batch plan do not depend on which
samples turn out to be bad.

`BatchPlan` fixes the global batch of every optimizer step from (seed, step) alone, never from the world size:
each rank takes its slice of the same list, so one process and N ranks see the same samples in the same step.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..validate import InputError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_SOURCE_EXT = re.compile(r"^source(?:_?(\d+))?\.(png|jpg|jpeg|webp)$")
MAX_ASPECT = 4.0
BUCKET_STEP = 32


# ---- aspect buckets ----

def aspect_buckets(image_size: int) -> list[tuple[int, int]]:
    """(height, width) buckets: multiples of 32, area within 20% of image_size**2, aspect <= 4, sorted by w/h.

    For every side length a (multiple of 32) the other side is area / a rounded to 32; both orientations.
    image_size=128 gives 256x64, 224x64, 192x96, 160x96, 128x128 and their transposes.
    """
    if not isinstance(image_size, int) or image_size < BUCKET_STEP or image_size % BUCKET_STEP:
        raise InputError(f"image_size={image_size!r} must be a multiple of {BUCKET_STEP} >= {BUCKET_STEP} "
                         f"when buckets are enabled")
    area = image_size * image_size
    found = set()
    for a in range(BUCKET_STEP, 2 * image_size + 1, BUCKET_STEP):  # aspect <= 4 bounds a side by 2 * size
        b = max(BUCKET_STEP, round(area / a / BUCKET_STEP) * BUCKET_STEP)
        if max(a, b) / min(a, b) <= MAX_ASPECT and abs(a * b - area) <= 0.2 * area:
            found |= {(a, b), (b, a)}
    return sorted(found, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(buckets: list[tuple[int, int]], width: int, height: int) -> int:
    """Index of the bucket whose aspect ratio is closest in log scale (ties: the first, i.e. the tallest)."""
    r = math.log(max(width, 1) / max(height, 1))
    return min(range(len(buckets)), key=lambda k: abs(math.log(buckets[k][1] / buckets[k][0]) - r))


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so the image covers height x width (aspect kept, bicubic), then centre-crop to exactly that."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _rgb(image: Image.Image) -> Image.Image:
    # transparent pixels become white (not the black that a plain convert("RGB") gives)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


# ---- the index ----

@dataclass(slots=True)
class _Entry:
    image: tuple | None  # ("file", path) | ("tar", shard, offset, size) | None (no image member)
    text: object = None  # raw caption, validated when read
    sources: list = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height) when the metadata gives it
    error: str | None = None  # a reason known at indexing time


def _resolve(root: str) -> tuple[str, list[Path]]:
    path = Path(root)
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return "folder", [path]
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    elif path.is_file() and path.suffix == ".tar":
        shards = [path]
    else:
        shards = sorted(Path(p) for p in glob.glob(str(root)) if p.endswith(".tar"))
    if not shards:
        raise InputError(f"data {str(root)!r} is not a folder with metadata.jsonl, a directory of .tar shards, "
                         f"a .tar file or a glob matching .tar files")
    return "tar", shards


def _size_from(meta: dict) -> tuple[int, int] | None:
    w, h = meta.get("width"), meta.get("height")
    return (w, h) if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0 else None


def _index_folder(root: Path) -> list[_Entry]:
    entries = []
    with open(root / "metadata.jsonl", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
                name = meta["file_name"]
                sources = meta.get("source_file_names") or []
                if not isinstance(name, str) or not isinstance(sources, list):
                    raise TypeError("file_name must be a string and source_file_names a list")
            except (ValueError, KeyError, TypeError, AttributeError):
                entries.append(_Entry(image=None, error="bad_metadata"))
                continue
            entries.append(_Entry(image=("file", root / name), text=meta.get("text"),
                                  sources=[("file", root / str(s)) for s in sources], size=_size_from(meta)))
    return entries


def _index_tar(shard: Path, skipped: Counter) -> list[_Entry]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                head, _, base = member.name.rpartition("/")
                key, dot, ext = base.partition(".")
                if dot:
                    groups.setdefault(f"{head}/{key}", {})[ext.lower()] = member
    except (tarfile.TarError, OSError) as e:  # truncated/corrupt shard: keep the members read so far
        log.warning("tar shard %s is unreadable after %d samples: %s", shard, len(groups), e)
        skipped["bad_shard"] += 1
    entries = []
    with open(shard, "rb") as f:
        def read(m):
            f.seek(m.offset_data)
            return f.read(m.size)

        for members in groups.values():
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            entry = _Entry(image=("tar", shard, members[ext].offset_data, members[ext].size) if ext else None)
            sources = sorted((int(m.group(1) or 0), e) for e in members if (m := _SOURCE_EXT.match(e)))
            entry.sources = [("tar", shard, members[e].offset_data, members[e].size) for _, e in sources]
            try:
                if "txt" in members:
                    entry.text = read(members["txt"]).decode("utf-8")
                if "json" in members:
                    meta = json.loads(read(members["json"]))
                    if entry.text is None:
                        entry.text = meta.get("text", meta.get("caption"))
                    entry.size = _size_from(meta)
            except (ValueError, AttributeError, OSError):
                entry.error = "bad_metadata"
            entries.append(entry)
    return entries


def _file(ref: tuple):
    """A path or an in-memory file for Image.open."""
    if ref[0] == "file":
        return ref[1]
    _, shard, offset, size = ref
    with open(shard, "rb") as f:
        f.seek(offset)
        return io.BytesIO(f.read(size))


def _open(ref: tuple) -> Image.Image:
    with Image.open(_file(ref)) as im:
        im.load()
        return _rgb(im)


def _header_size(ref: tuple) -> tuple[int, int] | None:
    try:
        with Image.open(_file(ref)) as im:  # lazy: parses the header only
            return im.size
    except Exception:  # noqa: BLE001 - any failure here is reported when the sample is read
        return None


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style image-caption dataset; see the module docstring for the accepted layouts.

    `dataset[i]` -> {"index": i, "image": (3, H, W) float in [-1, 1], "text": str, "sources": [(3, h, w), ...]}
    or None (reason counted in `dataset.skipped`). Without buckets every image (and source) is resized and
    centre-cropped to image_size x image_size; with buckets to its nearest aspect bucket (`dataset.buckets`,
    `dataset.bucket_ids[i]`; sources to their own nearest bucket).
    """

    def __init__(self, root: str | os.PathLike, image_size: int, buckets: bool = False):
        if not isinstance(image_size, int) or image_size < 1:
            raise InputError(f"image_size={image_size!r} must be a positive integer")
        self.root, self.image_size = str(root), image_size
        self.skipped: Counter = Counter()
        kind, paths = _resolve(self.root)
        if kind == "folder":
            self.entries = _index_folder(paths[0])
        else:
            self.entries = [e for shard in paths for e in _index_tar(shard, self.skipped)]
        self.buckets = aspect_buckets(image_size) if buckets else [(image_size, image_size)]
        self.bucket_ids = None
        if buckets:
            self.bucket_ids = []
            for e in self.entries:
                size = e.size or (_header_size(e.image) if e.image else None) or (1, 1)
                self.bucket_ids.append(nearest_bucket(self.buckets, *size))

    def __len__(self) -> int:
        return len(self.entries)

    def bucket_of(self, i: int) -> tuple[int, int]:
        """(height, width) that sample i is resized to."""
        return self.buckets[self.bucket_ids[i]] if self.bucket_ids is not None else self.buckets[0]

    def _skip(self, i: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= 10:  # a few warnings, not one per sample of a broken set
            log.warning("skipping sample %d of %s: %s %s", i, self.root, reason, detail)

    def _load(self, ref: tuple | None, bucket: tuple[int, int] | None) -> torch.Tensor:
        if ref is None:
            raise FileNotFoundError("no image member")
        image = _open(ref)
        if bucket is None:
            bucket = self.buckets[nearest_bucket(self.buckets, *image.size)]
        return to_tensor(fit(image, *bucket))

    def __getitem__(self, i: int) -> dict | None:
        if not 0 <= i < len(self.entries):
            raise IndexError(f"index {i} out of range for a dataset of {len(self.entries)} samples")
        e = self.entries[i]
        if e.error:
            self._skip(i, e.error)
            return None
        if not isinstance(e.text, str) or not e.text.strip():
            self._skip(i, "no_caption")
            return None
        try:
            image = self._load(e.image, self.bucket_of(i))
            sources = [self._load(s, None if self.bucket_ids is not None else self.buckets[0]) for s in e.sources]
        except FileNotFoundError as err:
            self._skip(i, "missing", str(err))
            return None
        except Exception as err:  # noqa: BLE001 - decoder errors vary by format; a bad sample never stops a run
            self._skip(i, "unreadable", f"{type(err).__name__}: {err}")
            return None
        return {"index": i, "image": image, "text": e.text.strip(), "sources": sources}


# ---- the batch plan ----

class BatchPlan:
    """The global batch of every optimizer step, from (seed, step) only.

    Epoch e: the dataset's indices are grouped by bucket (one group without buckets); each group is permuted
    (numpy PCG64 seeded by [seed, e, 0, group]) and cut into batches of batch_size, the last one topped up from
    the start of the same permutation (so every batch is full and single-bucket; every index appears at least
    once per epoch, exactly once when each group's size is a multiple of batch_size); then the order of all the
    epoch's batches is shuffled (seeded by [seed, e, 1]). Epochs have a fixed number of steps
    (`steps_per_epoch`), so step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.
    Bad samples stay in the plan: the loop receives None for them, and the loss normalisation by the global
    count makes a smaller batch exact.
    """

    def __init__(self, dataset, batch_size: int, seed: int):
        n = len(dataset)
        if n < 1:
            raise InputError(f"the dataset is empty: nothing to plan batches from ({getattr(dataset, 'root', '')})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer")
        self.batch_size, self.seed = batch_size, seed % 2**63  # SeedSequence takes non-negative entropy
        ids = getattr(dataset, "bucket_ids", None)
        if ids is None:
            self.groups = [np.arange(n)]
        else:
            ids = np.asarray(ids)
            self.groups = [np.flatnonzero(ids == k) for k in np.unique(ids)]
        self.steps_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            batches = []
            for k, group in enumerate(self.groups):
                perm = group[np.random.default_rng([self.seed, epoch, 0, k]).permutation(len(group))]
                full = math.ceil(len(group) / self.batch_size) * self.batch_size
                batches.append(np.resize(perm, full).reshape(-1, self.batch_size))  # resize repeats cyclically
            batches = np.concatenate(batches)
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            if len(self._cache) >= 2:  # steps move forward: keep the current and the previous epoch
                self._cache.pop(min(self._cache))
            self._cache[epoch] = batches[order]
        return self._cache[epoch]

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        if not isinstance(step, int) or step < 0:
            raise InputError(f"step={step!r} must be an integer >= 0")
        return self._epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch].tolist()


# ---- preparation and conversion ----

def prepare_data(cfg) -> str:
    """The data root of a run: cfg.data, or a shapes set of cfg.data_n images generated once into <out>/data.

    Idempotent: a set whose `.complete` marker (written last) records the same generator, size and seed is
    reused; an interrupted or different one is generated again (deterministically, so a rerun is identical).
    """
    if cfg.data:
        _resolve(cfg.data)  # a clear error now rather than in the first step
        return cfg.data
    from ..data.shapes import generate_shapes

    root = Path(cfg.out) / "data"
    marker = root / ".complete"
    want = {"generator": "shapes", "n": cfg.data_n, "seed": cfg.seed, "split": "train"}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return str(root)
        except ValueError:
            pass
        marker.unlink()
    generate_shapes(root, cfg.data_n, cfg.seed, "train")
    tmp = root / f".complete.tmp{os.getpid()}"
    tmp.write_text(json.dumps(want))
    os.replace(tmp, marker)
    return str(root)


def folder_to_shards(src: str | os.PathLike, dst: str | os.PathLike, per_shard: int = 1000) -> list[str]:
    """Pack a metadata.jsonl folder into webdataset tar shards `dst/shard-00000.tar`, ... (same sample order).

    Each sample: `key.<ext>` image, `key.txt` caption (when present), `key.json` (its metadata minus file
    names), `key.source_<j>.<ext>` sources. Missing files are left out, so the shards fail the same way;
    unparsable metadata lines are left out (with a warning).
    """
    if per_shard < 1:
        raise InputError(f"per_shard={per_shard!r} must be >= 1")
    src, dst = Path(src), Path(dst)
    records = []
    for line in (src / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line)) if line.strip() else None
        except ValueError:
            log.warning("folder_to_shards: leaving out an unparsable metadata line of %s", src)
    dst.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(records), per_shard):
        path = dst / f"shard-{s // per_shard:05d}.tar"
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with tarfile.open(tmp, "w") as tf:
            for i, meta in enumerate(records[s:s + per_shard], start=s):
                key = f"{i:08d}"
                files = [(meta.get("file_name"), "")] + [(n, f"source_{j}.") for j, n in
                                                           enumerate(meta.get("source_file_names") or [])]
                for name, prefix in files:
                    if isinstance(name, str) and (src / name).is_file():
                        ext = Path(name).suffix.lstrip(".").lower()
                        tf.add(src / name, arcname=f"{key}.{prefix}{ext}")
                rest = {k: v for k, v in meta.items() if k not in ("file_name", "source_file_names")}
                members = [("json", json.dumps(rest).encode())]
                if isinstance(meta.get("text"), str):
                    members.append(("txt", meta["text"].encode("utf-8")))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        paths.append(str(path))
    return paths
