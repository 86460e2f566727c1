"""What the CLI writes: independent seeded draws, the parameters inside each file, file modes, interruption;
what it reads: 16-bit and transparent sources; the thread count it picks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glimage.cli import main
from glimage.image import load_image
from glimage.outputs import read_parameters, save_image
from glimage.pipeline import GlmImagePipeline

ARGS = ["--steps", "2", "-q"]


@pytest.fixture(scope="module")
def shipped():
    p = GlmImagePipeline.from_pretrained(device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def test_num_images_are_independent_draws_reproducible_one_by_one(tmp_path, capsys, shipped):
    assert main(["generate", "a red circle", "--seed", "7", "--num-images", "3", "-o", str(tmp_path / "a.png"),
                 *ARGS]) == 0
    files = [tmp_path / f"a_{i}.png" for i in range(3)]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    assert [read_parameters(f)["seed"] for f in files] == [7, 8, 9]
    # image 1 is exactly the single draw with seed 8
    assert main(["generate", "a red circle", "--seed", "8", "-o", str(tmp_path / "b.png"), *ARGS]) == 0
    assert np.array_equal(np.asarray(Image.open(files[1])), np.asarray(Image.open(tmp_path / "b.png")))
    # independent AR draws: the prior tokens differ from seed to seed (num_images_per_prompt would share them)
    ids = [shipped.generate_prior_tokens("a red circle", 128, 128, seed=s) for s in (7, 8, 9)]
    assert not torch.equal(ids[0], ids[1]) and not torch.equal(ids[1], ids[2])
    out = shipped("a red circle", num_inference_steps=2, seed=7, num_images_per_prompt=2, output_type="latent")
    assert out.prior_token_ids.shape[0] == 1  # the reference's meaning: one AR draw per prompt


def test_no_seed_means_a_fresh_seed_printed_and_recorded(tmp_path, capsys):
    seeds = []
    for name in ("a.png", "b.png"):
        assert main(["generate", "a red circle", "-o", str(tmp_path / name), "--steps", "2"]) == 0
        err = capsys.readouterr().err
        line = next(l for l in err.splitlines() if l.startswith("seed ") and "--seed" in l)
        seeds.append(int(line.split()[1]))
        assert read_parameters(tmp_path / name)["seed"] == seeds[-1]
    assert seeds[0] != seeds[1]


def test_parameters_travel_in_png_jpeg_and_webp(tmp_path, capsys):
    for suffix in ("png", "jpg", "webp"):
        out = tmp_path / f"x.{suffix}"
        assert main(["generate", 'a sign that says "ÄBC"', "--seed", "3", "--guidance", "2.5", "-o", str(out),
                     *ARGS]) == 0
        p = read_parameters(out)
        assert p == {"prompt": 'a sign that says "ÄBC"', "seed": 3, "height": 128, "width": 128,
                     "num_inference_steps": 2, "guidance_scale": 2.5, "model": "shipped",
                     "glimage": p["glimage"]}
    capsys.readouterr()
    assert main(["info", str(tmp_path / "x.png")]) == 0
    text = capsys.readouterr().out
    assert 'a sign that says "ÄBC"' in text and "seed" in text and "2.5" in text


def test_size_is_width_x_height_and_one_side_takes_the_others_default(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "--seed", "1", "--size", "96x64", "-o", str(a), *ARGS]) == 0
    assert Image.open(a).size == (96, 64) and (read_parameters(a)["width"], read_parameters(a)["height"]) == (96, 64)
    assert main(["generate", "a red circle", "--seed", "1", "--height", "64", "-o", str(b), *ARGS]) == 0
    assert Image.open(b).size == (128, 64)  # the shipped model's default width


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_keep_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png", {"seed": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise SystemExit(143)  # what the CLI's SIGTERM handler raises, here at the worst moment
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(SystemExit):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_ends_a_run_cleanly(tmp_path):
    """SIGTERM in the middle of --num-images: exit 143, every written image complete, no temporary file."""
    out = tmp_path / "x.png"
    proc = subprocess.Popen([sys.executable, "-m", "glimage.cli", "generate", "a red circle", "--seed", "0",
                             "--num-images", "200", "-o", str(out), *ARGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("x_*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    written = sorted(tmp_path.iterdir())
    assert written and all(p.name.startswith("x_") and p.suffix == ".png" for p in written), written
    for p in written:
        Image.open(p).load()  # complete files only


def test_sixteen_bit_and_float_greyscale_sources_keep_their_tones(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(load_image(tmp_path / "g16.png"))[..., 0].astype(int)
    want = np.round(ramp / 257).astype(int)
    assert np.abs(got - want).max() <= 1 and got.min() == 0 and got.max() == 255  # not a white image
    f = Image.fromarray((ramp / 65535).astype(np.float32), mode="F")
    assert np.abs(np.asarray(load_image(f))[..., 0].astype(int) - want).max() <= 1


def test_transparency_is_composited_onto_white_like_the_reference():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half, opaque on the right
    rgba[:, 4:, 3] = 255
    got = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert (got[:, :4] == 255).all() and (got[:, 4:] == [200, 0, 0]).all()
    pytest.importorskip("transformers")
    from transformers.image_transforms import convert_to_rgb
    assert np.array_equal(got, np.asarray(convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True)))


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    import glimage.device as device
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for busy, want in ((0.0, 4), (0.2, 4), (1.0, 3), (2.6, 1), (3.9, 1), (8.0, 1)):
        monkeypatch.setattr(device, "busy_cpus", lambda window=0.05, b=busy: b)
        assert device.auto_threads() == want, busy
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit environment wins over auto
    before = torch.get_num_threads()
    assert device.set_threads("auto") == before


def test_busy_cpus_sees_a_busy_core():
    from glimage.device import busy_cpus
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert busy_cpus(0.3) >= 0.6
    finally:
        hog.kill()
