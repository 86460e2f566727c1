"""Training data: folder and tar-shard datasets agree, bad samples are skipped and counted, aspect buckets,
the deterministic batch plan, and idempotent data preparation."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from glimage.data.shapes import generate_shapes
from glimage.train.config import TrainConfig
from glimage.train.data import (BatchPlan, ImageTextDataset, aspect_buckets, fit, folder_to_shards,
                                nearest_bucket, prepare_data)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, 30, seed=0)
    return root


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_folder_reads_images_and_captions(shapes_dir):
    ds = ImageTextDataset(shapes_dir, image_size=128)
    records = [json.loads(l) for l in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert len(ds) == len(records)
    for i in (0, 5, 17):
        item = ds[i]
        assert item["index"] == i and item["text"] == records[i]["text"] and item["sources"] == []
        pixels = np.asarray(Image.open(shapes_dir / records[i]["file_name"]).convert("RGB"))
        expected = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert item["image"].dtype == torch.float32
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)  # same size: no resampling
        assert item["image"].min() >= -1 and item["image"].max() <= 1
    small = ImageTextDataset(shapes_dir, image_size=64)[0]["image"]
    assert small.shape == (3, 64, 64) and small.min() >= -1 and small.max() <= 1
    assert not ds.skipped


def test_tar_shards_equal_folder(shapes_dir, tmp_path):
    folder = ImageTextDataset(shapes_dir, image_size=64)
    paths = folder_to_shards(shapes_dir, tmp_path / "shards", per_shard=7)
    assert len(paths) == 5
    for root in (tmp_path / "shards", str(tmp_path / "shards" / "shard-*.tar")):
        shards = ImageTextDataset(root, image_size=64)
        assert len(shards) == len(folder)
        for i in range(len(folder)):
            a, b = folder[i], shards[i]
            assert a["text"] == b["text"] and a["index"] == b["index"]
            assert torch.equal(a["image"], b["image"])
        assert not shards.skipped
    assert len(ImageTextDataset(paths[0], image_size=64)) == 7  # a single .tar file


def test_webdataset_tar_with_json_caption_and_sources(tmp_path):
    red = Image.new("RGB", (40, 80), (255, 0, 0))
    blue = Image.new("RGB", (96, 32), (0, 0, 255))
    jpg = io.BytesIO()
    red.save(jpg, format="JPEG", quality=95)
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        _add(tf, "sub/k1.jpg", jpg.getvalue())
        _add(tf, "sub/k1.json", json.dumps({"caption": "a red thing"}).encode())
        _add(tf, "sub/k1.source_1.png", _png(red))
        _add(tf, "sub/k1.source_0.png", _png(blue))
        _add(tf, "sub/k2.png", _png(blue))
        _add(tf, "sub/k2.txt", b"  a blue thing \n")
    ds = ImageTextDataset(tmp_path / "a.tar", image_size=32)
    a, b = ds[0], ds[1]
    assert a["text"] == "a red thing" and b["text"] == "a blue thing"
    assert a["image"].shape == (3, 32, 32)
    assert [s[2].mean().item() for s in a["sources"]] == pytest.approx([1.0, -1.0], abs=1e-6)  # source_0 first
    assert b["image"][2].min().item() == 1.0 and b["image"][0].max().item() == -1.0


def test_bad_samples_skipped_and_counted(tmp_path, shapes_dir):
    good = Image.open(shapes_dir / "000000.png")
    good.save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "truncated.png").write_bytes(_png(good)[:200])
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    lines = [
        {"file_name": "good.png", "text": "a good one"},
        {"file_name": "corrupt.png", "text": "a corrupt image"},
        {"file_name": "good.png"},  # no caption
        {"file_name": "good.png", "text": "   "},  # empty caption
        {"file_name": "gone.png", "text": "a missing file"},
        {"file_name": "truncated.png", "text": "a truncated image"},
        {"file_name": "good.png", "text": "an edit", "source_file_names": ["corrupt.png"]},
        {"file_name": "clear.png", "text": "transparent becomes white"},
    ]
    text = "\n".join(json.dumps(l) for l in lines) + "\n{not json\n"
    (tmp_path / "metadata.jsonl").write_text(text)
    ds = ImageTextDataset(tmp_path, image_size=32)
    items = [ds[i] for i in range(len(ds))]  # never raises
    assert [it is not None for it in items] == [True, False, False, False, False, False, False, True, False]
    assert ds.skipped == {"unreadable": 3, "no_caption": 2, "missing": 1, "bad_metadata": 1}
    assert items[7]["image"].min().item() == 1.0
    # the same failures from tar shards
    folder_to_shards(tmp_path, tmp_path / "shards", per_shard=4)
    shards = ImageTextDataset(tmp_path / "shards", image_size=32)
    shard_items = [shards[i] for i in range(len(shards))]
    assert sum(it is not None for it in shard_items) == 2
    assert shards.skipped["unreadable"] == 3 and shards.skipped["no_caption"] == 2
    # a corrupt shard is counted, the good shards still serve their samples
    (tmp_path / "shards" / "shard-00002.tar").write_bytes(b"garbage" * 100)
    ds2 = ImageTextDataset(tmp_path / "shards", image_size=32)
    assert ds2.skipped["bad_shard"] == 1 and len(ds2) == 8
    with pytest.raises(ValueError, match="metadata.jsonl"):
        ImageTextDataset(tmp_path / "nothing_here", image_size=32)


def test_aspect_buckets(tmp_path):
    buckets = aspect_buckets(128)
    assert (128, 128) in buckets and (64, 256) in buckets and (256, 64) in buckets
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and max(h, w) / min(h, w) <= 4
        assert abs(h * w - 128 * 128) <= 0.2 * 128 * 128
        assert (w, h) in buckets
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert buckets[nearest_bucket(buckets, 200, 100)] == (96, 192)
    assert buckets[nearest_bucket(buckets, 100, 300)] == (224, 64)
    assert buckets[nearest_bucket(buckets, 1000, 100)] == (64, 256)  # beyond aspect 4: the widest bucket
    with pytest.raises(ValueError, match="multiple of 32"):
        aspect_buckets(100)

    sizes = [(200, 100), (100, 300), (128, 128), (130, 120), (64, 256)]
    lines = []
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (0, 255, 0)).save(tmp_path / f"{k}.png")
        lines.append({"file_name": f"{k}.png", "text": f"image {k}", "source_file_names": [f"{(k + 1) % 5}.png"]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    ds = ImageTextDataset(tmp_path, image_size=128, buckets=True)
    shapes = [tuple(ds[i]["image"].shape[1:]) for i in range(len(ds))]
    assert shapes == [(96, 192), (224, 64), (128, 128), (128, 128), (256, 64)]
    assert shapes == [ds.bucket_of(i) for i in range(len(ds))]
    assert tuple(ds[0]["sources"][0].shape[1:]) == (224, 64)  # a source gets its own bucket
    assert tuple(ImageTextDataset(tmp_path, image_size=128)[0]["sources"][0].shape[1:]) == (128, 128)


def test_fit_centre_crops():
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 80, 100))  # red at the left: cropped away when centre-cropping to square
    out = np.asarray(fit(image, 64, 64))
    assert out.shape == (64, 64, 3) and (out == 255).all()


class _Sized:
    def __init__(self, n, bucket_ids=None):
        self.n, self.bucket_ids = n, bucket_ids

    def __len__(self):
        return self.n


def test_batch_plan_deterministic_and_covering():
    plan = BatchPlan(_Sized(24), batch_size=6, seed=1)
    assert plan.steps_per_epoch == 4
    batches = [plan.indices(s) for s in range(12)]
    for e in range(3):  # each epoch is a permutation of the dataset
        epoch = sum(batches[4 * e:4 * e + 4], [])
        assert sorted(epoch) == list(range(24))
    assert batches[:4] != batches[4:8]  # a new permutation every epoch
    fresh = BatchPlan(_Sized(24), batch_size=6, seed=1)
    assert [fresh.indices(s) for s in (11, 3, 7, 0)] == [batches[s] for s in (11, 3, 7, 0)]  # resume anywhere
    assert BatchPlan(_Sized(24), 6, seed=2).indices(0) != batches[0]

    uneven = BatchPlan(_Sized(25), batch_size=6, seed=0)
    assert uneven.steps_per_epoch == 5
    for e in range(2):
        epoch = [uneven.indices(s) for s in range(5 * e, 5 * e + 5)]
        assert all(len(b) == 6 and len(set(b)) == 6 for b in epoch)  # full batches, no repeats in one
        assert set(sum(epoch, [])) == set(range(25))
    small = BatchPlan(_Sized(3), batch_size=8, seed=0).indices(0)  # smaller than a batch: repeats
    assert len(small) == 8 and set(small) == {0, 1, 2}
    with pytest.raises(ValueError, match="step=-1"):
        plan.indices(-1)
    with pytest.raises(ValueError, match="empty"):
        BatchPlan(_Sized(0), 4, 0)


def test_batch_plan_buckets():
    ids = [0] * 12 + [1] * 8 + [2] * 5
    plan = BatchPlan(_Sized(25, ids), batch_size=4, seed=0)
    assert plan.steps_per_epoch == 3 + 2 + 2
    for e in range(2):
        epoch = [plan.indices(s) for s in range(7 * e, 7 * e + 7)]
        for b in epoch:
            assert len({ids[i] for i in b}) == 1 and len(b) == 4
        assert set(sum(epoch, [])) == set(range(25))
    # the epoch's batches are shuffled across buckets, differently every epoch
    orders = {tuple(ids[plan.indices(s)[0]] for s in range(7 * e, 7 * e + 7)) for e in range(5)}
    assert len(orders) > 1


def test_prepare_data_idempotent(tmp_path):
    cfg = TrainConfig(stage="vae", out=str(tmp_path / "run"), data_n=12, seed=4)
    root = prepare_data(cfg)
    assert root == str(tmp_path / "run" / "data")
    marker = tmp_path / "run" / "data" / ".complete"
    assert marker.is_file() and len(ImageTextDataset(root, 128)) == 12
    first = os.stat(tmp_path / "run" / "data" / "000000.png").st_mtime_ns
    assert prepare_data(cfg) == root
    assert os.stat(tmp_path / "run" / "data" / "000000.png").st_mtime_ns == first  # reused, not rewritten
    marker.unlink()  # an interrupted generation: done again, identically
    meta = (tmp_path / "run" / "data" / "metadata.jsonl").read_text()
    assert prepare_data(cfg) == root and marker.is_file()
    assert (tmp_path / "run" / "data" / "metadata.jsonl").read_text() == meta
    bigger = TrainConfig(stage="vae", out=str(tmp_path / "run"), data_n=18, seed=4)
    assert len(ImageTextDataset(prepare_data(bigger), 128)) == 18
    given = TrainConfig(stage="vae", out=str(tmp_path / "other"), data=root)
    assert prepare_data(given) == root and not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="not a folder"):
        prepare_data(TrainConfig(stage="vae", data=str(tmp_path / "missing")))
