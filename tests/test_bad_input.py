"""Bad input, table by table (CLI generate/info/train, Python API, model folders, images, output paths).

Every case must end in exit status 2 (InputError for the API) with a message naming the bad value, no
traceback, and no file left behind. The CLI cases run in-process through `glimage.cli.main` (what the
`glimage` script calls); one runs as a real subprocess with non-UTF-8 bytes in argv.
"""

import importlib.util
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glimage.cli import main
from glimage.pipeline import DEFAULT_MODEL, GlmImagePipeline
from glimage.validate import InputError


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb's calling card), with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def unwritable_dir(tmp: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
        return Path("/sys")
    d = tmp / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return d


def touch(path: Path, text: str = "") -> Path:
    path.write_text(text)
    return path


def tree(root: Path) -> set:
    return {p.relative_to(root) for p in root.rglob("*")} if root.exists() else set()


# -- model folders, broken in one way each

def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


FOLDER_DAMAGE = {
    "zero-byte weights": ("transformer/diffusion_pytorch_model.safetensors", lambda p: p.write_bytes(b""),
                          ["diffusion_pytorch_model.safetensors", "not a readable safetensors file"]),
    "truncated weights": ("vae/diffusion_pytorch_model.safetensors", _truncate,
                          ["vae/diffusion_pytorch_model.safetensors", "not a readable safetensors file"]),
    "corrupt header": ("text_encoder/model.safetensors", lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
                       ["text_encoder/model.safetensors", "not a readable safetensors file"]),
    "config is a list": ("vae/config.json", lambda p: p.write_text("[]"), ["vae/config.json", "JSON object"]),
    "config is garbage": ("transformer/config.json", lambda p: p.write_text("{not json"),
                          ["transformer/config.json", "not readable JSON"]),
    "config value of the wrong type": ("transformer/config.json",
                                       lambda p: p.write_text(p.read_text().replace('"num_layers": 6', '"num_layers": "six"')),
                                       ["transformer/config.json", "num_layers", "six"]),
    "missing weights": ("text_encoder/model.safetensors", lambda p: p.unlink(), ["no weights in", "text_encoder"]),
    "config missing a key": ("vae/config.json", lambda p: p.write_text('{"_class_name": "AutoencoderKL"}'),
                                ["vae/config.json", "block_out_channels"]),
}


@pytest.fixture
def broken(tmp_path):
    def make(case: str) -> Path:
        rel, damage, _ = FOLDER_DAMAGE[case]
        folder = tmp_path / "model"
        shutil.copytree(DEFAULT_MODEL, folder)
        damage(folder / rel)
        return folder
    return make


def run_cli(argv, capsys, tmp_path):
    before = tree(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals (a non-integer --steps) exit 2 as well
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert tree(tmp_path) == before, f"files left behind: {tree(tmp_path) - before}"
    return rc, err


def gen(tmp, *extra, out=None):
    return ["generate", "a red circle", "-o", str(out or tmp / "out" / "x.png"), "--steps", "2", "-q", *extra]


CLI_CASES = {
    "invalid UTF-8 prompt": (lambda t: ["generate", "a red \udcff circle", "-o", str(t / "x.png")],
                             ["prompt", "not valid UTF-8", "ff"]),
    "empty prompt": (lambda t: ["generate", "", "-o", str(t / "x.png")], ["prompt is empty", "describe the image"]),
    "whitespace prompt": (lambda t: ["generate", " \t ", "-o", str(t / "x.png")], ["prompt is empty"]),
    "option typo": (lambda t: gen(t, "--seeed", "1"),
                    ["usage: glimage generate", "unrecognized arguments: --seeed 1", "did you mean --seed?"]),
    "option typo in eval shapes": (lambda t: ["eval", "shapes", "--n-per-categry", "2"],
                                   ["usage: glimage eval shapes", "did you mean --n-per-category?"]),
    "option typo in train": (lambda t: ["train", "tiny-ar", "--sett", "steps=1"], ["did you mean --set?"]),
    "unquoted prompt": (lambda t: ["generate", "a", "red", "circle", "-o", str(t / "x.png")],
                        ["unrecognized arguments: red circle", "quote"]),
    "size not WxH": (lambda t: gen(t, "--size", "128"), ["--size '128'", "WIDTHxHEIGHT"]),
    "size with height": (lambda t: gen(t, "--size", "128x128", "--height", "128"), ["--size", "not both"]),
    "size off the grid": (lambda t: gen(t, "--size", "128x70"), ["height=70", "multiple of 16"]),
    "device npu absent": (lambda t: gen(t, "--device", "npu"), ["'npu'", "not available"]),
    "device tpu unknown": (lambda t: gen(t, "--device", "tpu"), ["'tpu'", "cpu, cuda"]),
    "guidance inf": (lambda t: gen(t, "--guidance", "inf"), ["--guidance=inf", "[0, 50]"]),
    "guidance nan": (lambda t: gen(t, "--guidance", "nan"), ["--guidance=nan", "[0, 50]"]),
    "guidance absurd": (lambda t: gen(t, "--guidance", "1e6"), ["--guidance=1e+06", "[0, 50]"]),
    "steps 0": (lambda t: gen(t, "--steps", "0"), ["--steps=0", "[1, 1000]"]),
    "steps not a number": (lambda t: gen(t, "--steps", "abc"), ["--steps", "'abc'"]),
    "seed huge": (lambda t: gen(t, "--seed", str(2**64)), ["seed=18446744073709551616", "9223372036854775807"]),
    "seed negative": (lambda t: gen(t, "--seed", "-1"), ["seed=-1", "[0, "]),
    "num-images 0": (lambda t: gen(t, "--num-images", "0"), ["--num-images=0", "[1, 1000]"]),
    "height not on the grid": (lambda t: gen(t, "--height", "70"), ["height=70", "multiple of 16", "height=64"]),
    "width 0": (lambda t: gen(t, "--width", "0"), ["width=0", "multiple of 16"]),
    "size beyond the context": (lambda t: gen(t, "--width", "1024", "--height", "1024"), ["context of 1024 tokens"]),
    "threads 0": (lambda t: gen(t, "--threads", "0"), ["--threads", "1 to 1024"]),
    "output unwritable": (lambda t: gen(t, out=unwritable_dir(t) / "x.png"), ["x.png", "cannot be written"]),
    "output is a directory": (lambda t: gen(t, out=(t / "d.png").mkdir() or t / "d.png"), ["d.png", "is a directory"]),
    "output under a file": (lambda t: gen(t, out=touch(t / "f.txt") / "x.png"), ["f.txt", "is a file, not a folder"]),
    "output suffix": (lambda t: gen(t, out=t / "x.gif"), ["x.gif", ".png"]),
    "source is a directory": (lambda t: gen(t, "--image", str(t)), ["--image", "is a directory"]),
    "source missing": (lambda t: gen(t, "--image", str(t / "no.png")), ["no.png", "no such file"]),
    "source not an image": (lambda t: gen(t, "--image", str(touch(t / "a.png", "hello"))),
                            ["a.png", "not an image"]),
    "source truncated": (lambda t: gen(t, "--image", str(_truncated_png(t / "cut.png"))), ["cut.png", "broken image"]),
    "source decompression bomb": (lambda t: gen(t, "--image", str(png_header_only(t / "bomb.png", 15000, 15000))),
                                  ["bomb.png", "225.0 Mpx", "67 Mpx"]),
    "model missing": (lambda t: gen(t, "--model", str(t / "nope")), ["nope", "does not exist"]),
    "model preset unknown": (lambda t: gen(t, "--model", "random:huge"), ["random:huge", "random:tiny"]),
    "info on a missing path": (lambda t: ["info", str(t / "nope")], ["PATH '", "nope", "does not exist"]),
    "info on an image without parameters": (
        lambda t: ["info", str(Image.new("RGB", (8, 8)).save(t / "plain.png") or t / "plain.png")],
        ["plain.png", "no glimage generation parameters"]),
    "train steps=abc": (lambda t: ["train", "tiny-ar", "--set", "steps=abc"], ["steps='abc'", "integer"]),
    "train steps=1.5": (lambda t: ["train", "tiny-ar", "--set", "steps=1.5"], ["steps=1.5", "integer"]),
    "train model field of the wrong type": (lambda t: ["train", "tiny-ar", "--set", "model.dit.num_layers=abc"],
                                            ["model.dit.num_layers='abc'", "integer"]),
    "train model field unknown": (lambda t: ["train", "tiny-ar", "--set", "model.dit.layers=2"],
                                  ["model.dit.layers", "names no field", "num_layers"]),
    "train lr negative": (lambda t: ["train", "tiny-ar", "--set", "lr=-1"], ["lr=-1", "(0, 1]"]),
    "train lr inf": (lambda t: ["train", "tiny-ar", "--set", "lr=inf"], ["lr", "finite"]),
    "train unknown key": (lambda t: ["train", "tiny-ar", "--set", "stepz=3"], ["'stepz'", "unknown key"]),
    "train config garbage": (lambda t: ["train", str(touch(t / "c.toml", "steps = ["))],
                             ["c.toml", "not a readable TOML"]),
    "train unknown recipe": (lambda t: ["train", "tiny-nope"], ["'tiny-nope'", "recipes"]),
    "backend unknown": (lambda t: gen(t, "--backend", "jax"), ["--backend", "'jax'", "mindspore"]),
    "backend mindspore with a torch-only option": (lambda t: gen(t, "--backend", "mindspore", "--offload"),
                                                   ["--offload", "PyTorch backend only"]),
    "train backend mindspore for the vae": (lambda t: ["train", "tiny-vae", "--set", "backend='mindspore'"],
                                            ["backend=mindspore", "ar and decoder", "'vae'"]),
}
if importlib.util.find_spec("mindspore") is None:  # where it is installed, this command just works
    CLI_CASES["backend mindspore not installed"] = (lambda t: gen(t, "--backend", "mindspore"),
                                                    ["needs MindSpore", 'pip install "glimage[mindspore]"'])


def _truncated_png(path: Path) -> Path:
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(path)
    _truncate(path)
    return path


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, tmp_path, capsys):
    argv_of, wants = CLI_CASES[case]
    argv = argv_of(tmp_path)
    rc, err = run_cli(argv, capsys, tmp_path)
    assert rc == 2, err
    for want in wants:
        assert want in err, f"{want!r} not in {err!r}"


# `glimage info` reads the AR's config and every weight file's header (not the other configs)
@pytest.mark.parametrize("case,command", [(c, "generate") for c in sorted(FOLDER_DAMAGE)] +
                         [(c, "info") for c in sorted(FOLDER_DAMAGE) if FOLDER_DAMAGE[c][0].endswith(".safetensors")])
def test_model_folder_damage(case, command, broken, tmp_path, capsys):
    folder = broken(case)
    argv = gen(tmp_path, "--model", str(folder)) if command == "generate" else ["info", str(folder)]
    rc, err = run_cli(argv, capsys, tmp_path)
    assert rc == 2, err
    for want in FOLDER_DAMAGE[case][2]:
        assert want in err, f"{want!r} not in {err!r}"


def test_info_names_the_argument_the_user_gave(tmp_path, capsys):
    rc, err = run_cli(["info", str(tmp_path / "no.png")], capsys, tmp_path)
    assert rc == 2 and "--model" not in err and f"PATH {str(tmp_path / 'no.png')!r} does not exist" in err
    rc, err = run_cli(gen(tmp_path, "--model", str(tmp_path / "no")), capsys, tmp_path)
    assert rc == 2 and f"--model {str(tmp_path / 'no')!r} does not exist" in err


@pytest.mark.parametrize("size", [["--height", "1024", "--width", "1024"], ["--size", "1024x1024"],
                                  ["--width", "2048"], ["--model", "random:tiny", "--height", "70"],
                                  ["--model", "random:tiny", "--width", "8192"]])
def test_a_size_the_model_cannot_draw_is_refused_before_loading_and_before_a_seed(size, tmp_path, capsys,
                                                                                    monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("loaded a model for a size it cannot draw")
    monkeypatch.setattr(GlmImagePipeline, "from_pretrained", no_load)
    monkeypatch.setattr(GlmImagePipeline, "from_config", no_load)
    # no -q: a fresh seed would be announced on stderr
    rc, err = run_cli(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--steps", "2", *size], capsys,
                      tmp_path)
    assert rc == 2 and "error" in err, err
    assert not [line for line in err.splitlines() if line.startswith("seed")], err


def test_check_prompt():
    from glimage.validate import check_prompt
    assert check_prompt(" a red circle ") == " a red circle "
    for bad, msg in [("", "prompt is empty"), ("  \n\t", "prompt is empty"), (None, "must be a string"),
                     (b"x", "must be a string"), ("a\x00b", "NUL"), ("\udcff", "not valid UTF-8")]:
        with pytest.raises(InputError, match=msg) as e:
            check_prompt(bad)
        assert e.value.param == "prompt"
    with pytest.raises(InputError, match="5 characters long; at most 4"):
        check_prompt("abcde", max_chars=4)
    assert check_prompt("abcd", max_chars=4) == "abcd"


def test_invalid_utf8_argv_in_a_real_process(tmp_path):
    out = tmp_path / "x.png"
    r = subprocess.run([sys.executable, "-m", "glimage.cli", "generate", b"a \xff red circle", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not valid UTF-8" in r.stderr and "ff" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_unexpected_error_is_short_with_a_debug_hint(monkeypatch, capsys, tmp_path):
    import glimage.cli as cli
    monkeypatch.setattr(cli, "_info_image", lambda path: 1 / 0)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["info", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["info", str(tmp_path / "a.png"), "--debug"])


# -- the Python API: the same checks, as InputError (a ValueError) before any work

@pytest.fixture(scope="module")
def pipe():
    p = GlmImagePipeline.from_config("tiny", seed=0, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


API_CASES = [
    (dict(num_inference_steps=0), "num_inference_steps=0"), (dict(num_inference_steps=1.5), "num_inference_steps=1.5"),
    (dict(num_inference_steps=True), "num_inference_steps=True"), (dict(guidance_scale=math.nan), "guidance_scale=nan"),
    (dict(guidance_scale=math.inf), "guidance_scale=inf"), (dict(guidance_scale=-1.0), "guidance_scale=-1"),
    (dict(guidance_scale=1e6), "guidance_scale=1e+06"), (dict(guidance_scale="2"), "guidance_scale='2'"),
    (dict(height=70), "height=70"), (dict(height=0), "height=0"), (dict(width="64"), "width='64'"),
    (dict(height=64 * 70, width=64 * 70), "context of 4096 tokens"), (dict(width=64 * 300), "too elongated"),
    (dict(seed=-1), "seed=-1"), (dict(seed=2**64), "seed=18446744073709551616"), (dict(seed=1.5), "seed=1.5"),
    (dict(prompt=5), "prompt must be a string"), (dict(prompt=[]), "prompt must be a string"),
    (dict(prompt=["ok", 3]), "prompt must be a string"), (dict(prompt="bad \udcff"), "not valid UTF-8"),
    (dict(prompt=""), "prompt is empty"), (dict(prompt=["ok", " "]), "prompt is empty"),
    (dict(output_type="pt"), "output_type='pt'"), (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
    (dict(num_images_per_prompt=65), "num_images_per_prompt=65"),
    (dict(image="/nonexistent.png"), "no such file"), (dict(image=b"not an image"), "not an image file"),
    (dict(image=[Image.new("RGB", (64, 64))] * 9), "9 source images"),
    (dict(generator=__import__("torch").Generator(), seed=1), "either generator or seed"),
]


@pytest.mark.parametrize("kw,msg", API_CASES, ids=[m for _, m in API_CASES])
def test_api_bad_input(pipe, kw, msg):
    kw = {"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 1, "seed": 0, **kw}
    with pytest.raises(InputError) as e:
        pipe(**kw)
    assert msg in str(e.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns above 89 Mpx; we refuse
def test_api_refuses_a_decompression_bomb_before_decoding(pipe, tmp_path):
    # above PIL's own limit (2 x 89 Mpx) PIL refuses to open it; between ours (67 Mpx) and PIL's we refuse it
    # from the header
    with pytest.raises(InputError, match=r"b.png' is 225.0 Mpx"):
        pipe("x", image=png_header_only(tmp_path / "b.png", 15000, 15000), height=64, width=64)
    with pytest.raises(InputError, match=r"is 10000x9000 = 90.0 Mpx"):
        pipe("x", image=png_header_only(tmp_path / "c.png", 10000, 9000).read_bytes(), height=64, width=64)


def test_output_into_a_closed_pipe_is_not_a_bug():
    """`glimage info | true`: the reader is gone long before Python starts writing, so the write always fails
    with a broken pipe (`| head -1` would race with a short output)."""
    r = subprocess.run(f"{sys.executable} -m glimage.cli info | true", shell=True, capture_output=True, text=True,
                       timeout=60)
    assert r.stderr == "", r.stderr
