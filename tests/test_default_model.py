"""The shipped default model (preset `shapes`, package assets) and the tools that assemble and ship it."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from glimage.checkpoint import tensor_headers
from glimage.config import PRESETS
from glimage.pipeline import DEFAULT_MODEL, GlmImagePipeline
from glimage.train.ship import assemble, cast_folder, write_defaults


@pytest.fixture(scope="module")
def default_pipe():
    pipe = GlmImagePipeline.from_pretrained(device="cpu")  # no path: the shipped model
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_small_and_loads_strictly(default_pipe):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"shipped model is {size / 2**20:.1f} MiB"
    cfg, want = default_pipe.config, PRESETS["shapes"]
    # the architecture is the preset's (the VAE's latent statistics are measured at training)
    assert (cfg.ar, cfg.glyph, cfg.dit, cfg.scheduler) == (want.ar, want.glyph, want.dit, want.scheduler)
    assert cfg.vae.block_out_channels == want.vae.block_out_channels and cfg.vae.latents_std is not None
    # every stored tensor is used and every parameter stored: from_pretrained loads strictly, and the headers
    # agree with the modules one to one (half precision on disk, float32 in memory on the CPU)
    stored = tensor_headers(DEFAULT_MODEL / "transformer")
    assert set(stored) == set(default_pipe.dit.state_dict())
    assert {dtype for _, dtype in stored.values()} == {"F16"}
    assert next(default_pipe.dit.parameters()).dtype == torch.float32
    assert default_pipe.defaults == {"height": 128, "width": 128, "num_inference_steps": 20,
                                     "guidance_scale": 3.0}


def test_shipped_model_draws_single_objects(default_pipe):
    """A regression floor, not the issue's target: the `single` and `positioned` prompts of the fixed seeded
    eval set (n = 8 each, seeds as `glimage eval shapes` gives them), fully correct by the checker. Measured
    16 / 16 for the shipped model; the targets (>= 90% in distribution) are not reached yet (README)."""
    from glimage.data.shapes import eval_prompts
    from glimage.eval.shapes import check
    prompts = eval_prompts(seed=0, n_per_category=8)
    picked = [(i, p) for i, p in enumerate(prompts) if p["category"] in ("single", "positioned")]
    assert len(picked) == 16
    correct = sum(check(default_pipe(p["prompt"], seed=i).images[0], p)[0] for i, p in picked)
    assert correct >= 12, correct


def test_readme_first_command_draws_a_correct_image(tmp_path, default_pipe):
    """The README's first command (default model, its seed) writes the API's image, and the checker finds
    exactly what its prompt asks for."""
    from pathlib import Path

    from PIL import Image

    from glimage.eval.shapes import check

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    prompt, seed = re.search(r"glimage generate '([^']+)' --seed (\d+) -o out\.png", readme).groups()
    m = re.fullmatch(r"a (\w+) (\w+) at the (top|bottom)", prompt)
    assert m, f"README prompt {prompt!r}: the test knows the `at the top|bottom` template only"
    spec = {"prompt": prompt, "category": "positioned", "template": "top_bottom", "position": m[3], "word": None,
            "objects": [{"color": m[1], "shape": m[2]}]}
    out = tmp_path / "out.png"
    # one thread, as in this process (conftest): another thread count may round one pixel differently
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "glimage.cli", "generate", prompt, "--seed", seed, "-o", str(out), "-q"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    image = Image.open(out).convert("RGB")
    assert image.size == (128, 128)  # the folder's default size
    expected = default_pipe(prompt, seed=int(seed)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    ok, detail = check(image, spec)
    assert ok, detail


def _export(tmp_path, name, seed):
    pipe = GlmImagePipeline.from_config("tiny", seed=seed, device="cpu")
    pipe.save_pretrained(tmp_path / name)
    return pipe


def test_assemble_takes_the_ar_from_one_export_and_the_rest_from_the_other(tmp_path):
    a = _export(tmp_path, "ar", 0)
    d = _export(tmp_path, "dec", 1)
    d.ar.visual.load_state_dict(a.ar.visual.state_dict())  # same tokenizer, different LM / DiT
    d.ar.vqmodel.load_state_dict(a.ar.vqmodel.state_dict())
    d.save_pretrained(tmp_path / "dec")
    out = assemble(tmp_path / "ar", tmp_path / "dec", tmp_path / "model")
    got = GlmImagePipeline.from_pretrained(out, device="cpu")
    for x, y in zip(got.ar.state_dict().values(), a.ar.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(got.dit.state_dict().values(), d.dit.state_dict().values()):
        assert torch.equal(x, y)

    cast_folder(out, torch.float16)
    assert {dt for _, dt in tensor_headers(out / "transformer").values()} == {"F16"}
    half = GlmImagePipeline.from_pretrained(out, device="cpu")
    w = d.dit.proj_out.weight
    assert torch.equal(half.dit.proj_out.weight, w.half().float())

    write_defaults(out, ["height=64", "width=64", "num_inference_steps=2", "guidance_scale=1.0"])
    half = GlmImagePipeline.from_pretrained(out, device="cpu")
    half.set_progress_bar_config(disable=True)
    res = half("a red circle", seed=0, output_type="np")
    assert res.images.shape[1:3] == (64, 64)
    explicit = half("a red circle", seed=0, output_type="np", height=64, width=64, num_inference_steps=2,
                    guidance_scale=1.0)
    assert (res.images == explicit.images).all()
    with pytest.raises(ValueError, match="unknown default 'steps'"):
        write_defaults(out, ["steps=3"])
    assert write_defaults(out, ["guidance_scale=2"]) == {"height": 64, "width": 64, "num_inference_steps": 2,
                                                         "guidance_scale": 2.0}  # the others are kept
    # a VAE whose decoder alone was fine-tuned replaces the decoder export's; any other VAE is refused
    d.vae.decoder.conv_out.bias.data += 1
    d.save_pretrained(tmp_path / "vae_ft")
    out = assemble(tmp_path / "ar", tmp_path / "dec", tmp_path / "model", vae=tmp_path / "vae_ft")
    got = GlmImagePipeline.from_pretrained(out, device="cpu")
    assert torch.equal(got.vae.decoder.conv_out.bias, d.vae.decoder.conv_out.bias)
    d.vae.encoder.conv_in.bias.data += 1
    d.save_pretrained(tmp_path / "vae_other")
    with pytest.raises(ValueError, match="freeze_encoder"):
        assemble(tmp_path / "ar", tmp_path / "dec", tmp_path / "model", vae=tmp_path / "vae_other")


def test_assemble_refuses_exports_of_different_tokenizers(tmp_path):
    _export(tmp_path, "ar", 0)
    _export(tmp_path, "dec", 1)
    with pytest.raises(ValueError, match="different VQ tokenizers"):
        assemble(tmp_path / "ar", tmp_path / "dec", tmp_path / "model")


def test_grow_inserts_identity_layers_that_training_opens(tmp_path):
    from glimage.train.grow import grow_folder, grow_layers
    base = _export(tmp_path, "base", 0)
    base.set_progress_bar_config(disable=True)
    n = base.ar.cfg.text.num_hidden_layers
    assert grow_folder(tmp_path / "base", tmp_path / "grown", [0, n - 1]) == n + 2
    grown = GlmImagePipeline.from_pretrained(tmp_path / "grown", device="cpu")  # strict load of n + 2 layers
    grown.set_progress_bar_config(disable=True)
    a = base("a red circle", seed=0, height=64, width=64, num_inference_steps=2, output_type="np").images
    b = grown("a red circle", seed=0, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert np.array_equal(a, b)  # the same tokens and image: the new layers are exactly the identity
    new, old = grown.ar.language_model.layers[1], base.ar.language_model.layers[0]
    assert torch.equal(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight)
    assert not new.post_mlp_layernorm.weight.any() and not new.post_self_attn_layernorm.weight.any()
    ids = torch.randint(0, 100, (1, 5))
    pos = torch.arange(5).expand(3, 1, 5)
    grown.ar.language_model(ids, pos).square().mean().backward()
    assert new.post_mlp_layernorm.weight.grad.abs().sum() > 0  # gradient reaches the closed layer at once
    with pytest.raises(ValueError, match=rf"in 0\.\.{n - 1}"):
        grow_layers({}, n, [n])
    with pytest.raises(ValueError, match="exists"):  # never overwrites a folder
        grow_folder(tmp_path / "base", tmp_path / "grown", [0])
