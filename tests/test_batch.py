"""Offline batches in one process (`glimage generate --prompts FILE.jsonl --out DIR`): every line checked before
anything loads, the images equal `glimage generate`'s, the imagefolder layout, resume skipping what is done."""

import json

import numpy as np
import pytest
from PIL import Image

from glimage.batch import read_jobs
from glimage.card import ModelCard
from glimage.cli import main
from glimage.outputs import read_parameters
from glimage.pipeline import DEFAULT_MODEL
from glimage.validate import InputError


@pytest.fixture(scope="module")
def card():
    return ModelCard.read("", DEFAULT_MODEL)


def write(path, *records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"prompt": 3}', "prompt"),
    ('["a red circle"]', "JSON object"),
    ('{"prompt": "a", "sed": 3}', "did you mean 'seed'"),
    ('{"prompt": "a", "size": "100x100"}', "100"),
    ('{"prompt": "a", "num_inference_steps": 0}', "num_inference_steps"),
    ('{"prompt": "a", "guidance_scale": 99}', "guidance_scale"),
    ('{"prompt": "a", "file_name": "../x.png"}', "inside --out"),
    ('{"prompt": "a", "file_name": "x.gif"}', ".png"),
    ('{"prompt": "a", "image": "missing.png"}', "missing.png"),
    ('{"prompt": "a", "size": "128x128", "height": 128}', "not both"),
    ("{oops", "not a JSON object"),
])
def test_bad_lines_name_the_line(tmp_path, card, line, message):
    f = write(tmp_path / "p.jsonl", {"prompt": "a red circle"}, line)
    with pytest.raises(InputError, match=message) as e:
        read_jobs(f, card)
    assert "p.jsonl:2" in str(e.value)


def test_duplicate_file_names_and_empty_file(tmp_path, card):
    with pytest.raises(InputError, match="also line 1"):
        read_jobs(write(tmp_path / "p.jsonl", {"prompt": "a", "file_name": "x.png"},
                        {"prompt": "b", "file_name": "x.png"}), card)
    with pytest.raises(InputError, match="no prompts"):
        read_jobs(write(tmp_path / "e.jsonl", ""), card)


def test_defaults_seeds_and_extra_keys(tmp_path, card):
    jobs = read_jobs(write(tmp_path / "p.jsonl", {"prompt": "a"}, "", {"prompt": "b", "seed": 9, "tag": "x"},
                           {"prompt": "c", "size": "64x32"}), card, seed=100, steps=5)
    assert [(j.index, j.seed, j.steps, j.height, j.width) for j in jobs] == \
        [(0, 100, 5, 128, 128), (1, 9, 5, 128, 128), (2, 102, 5, 32, 64)]
    assert jobs[1].metadata() == {"file_name": "00001.png", "prompt": "b", "seed": 9, "height": 128, "width": 128,
                                  "num_inference_steps": 5, "guidance_scale": 3.0, "tag": "x"}


def test_batch_equals_generate_and_resumes(tmp_path, capsys):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (128, 128, 3), np.uint8)).save(src)
    prompts = write(tmp_path / "p.jsonl", {"prompt": "a red circle at the top", "num_inference_steps": 3},
                    {"prompt": "make it blue", "image": "src.png", "seed": 4, "num_inference_steps": 3,
                     "file_name": "edits/blue.webp"})
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--threads", "1", "-q"]) == 0
    rows = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00000.png", "edits/blue.webp"]
    assert read_parameters(out / "edits/blue.webp")["images"] == ["src.png"]
    # the same images as glimage generate
    assert main(["generate", "a red circle at the top", "--seed", "0", "--steps", "3", "-o", str(tmp_path / "a.png"),
                 "--threads", "1", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(out / "00000.png")))
    assert main(["generate", "make it blue", "--image", str(src), "--seed", "4", "--steps", "3", "-o",
                 str(tmp_path / "b.webp"), "--threads", "1", "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.webp")), np.asarray(Image.open(out / "edits/blue.webp")))
    # a rerun after a crash: only the missing image is drawn, the finished one is untouched
    (out / "edits/blue.webp").unlink()
    (out / "metadata.jsonl").unlink()
    before = (out / "00000.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--threads", "1"]) == 0
    assert "1 image(s) drawn, 1 already there" in capsys.readouterr().err
    assert (out / "00000.png").stat().st_mtime_ns == before and (out / "metadata.jsonl").is_file()
    # a folder made from other prompts is refused, not mixed
    other = write(tmp_path / "q.jsonl", {"prompt": "a green square", "num_inference_steps": 3})
    assert main(["generate", "--prompts", str(other), "--out", str(out), "-q"]) == 2
    assert "give a fresh --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "P"], "--out"),
    (["a red circle", "--out", "D"], "--out goes with --prompts"),
    (["a red circle", "--ray"], "--ray goes with --prompts"),
    (["--prompts", "P", "--out", "D", "--num-images", "2"], "--num-images"),
    (["--prompts", "P", "--out", "D", "--dit-actors", "2"], "go with --ray"),
    ([], "give a PROMPT"),
])
def test_batch_options(tmp_path, capsys, argv, message):
    f = write(tmp_path / "p.jsonl", {"prompt": "a"})
    argv = [str(f) if a == "P" else str(tmp_path / "d") if a == "D" else a for a in argv]
    assert main(["generate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_split_halves_draw_the_whole_pipelines_image(card, tmp_path):
    """What the Ray actors and replicas do: the AR half (parts=("ar",)) draws the prior ids, the DiT half
    (parts=("dit",)) the image; the same bytes as the whole pipeline, and neither half holds the other's weights."""
    from glimage.batch import draw, render
    from glimage.pipeline import GlmImagePipeline

    job = read_jobs(write(tmp_path / "p.jsonl", {"prompt": "a blue square at the top", "num_inference_steps": 3}),
                    card)[0]
    whole = GlmImagePipeline.from_pretrained()
    ar, dit = GlmImagePipeline.from_pretrained(parts=("ar",)), GlmImagePipeline.from_pretrained(parts=("dit",))
    assert ar.dit is None and ar.vae is None and ar.glyph_encoder is None and dit.ar is None
    assert render(dit, job, "m", prior=draw(ar, job)) == render(whole, job, "m")
    with pytest.raises(InputError, match="parts"):
        GlmImagePipeline.from_pretrained(parts=("vae",))


@pytest.mark.parametrize("argv", [["serve", "--ray"], ["generate", "--prompts", "P", "--out", "D", "--ray"]])
def test_ray_missing_is_a_clear_error(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray raises ImportError
    f = write(tmp_path / "p.jsonl", {"prompt": "a"})
    argv = [str(f) if a == "P" else str(tmp_path / "d") if a == "D" else a for a in argv]
    assert main(argv) == 2
    assert 'pip install "glimage[ray]"' in capsys.readouterr().err
