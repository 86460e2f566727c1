"""The pipeline's API on a random tiny model: options, bad input, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from glimage.cli import main
from glimage.pipeline import GlmImagePipeline


@pytest.fixture(scope="module")
def pipe():
    p = GlmImagePipeline.from_config("tiny", seed=0, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_random")
    pipe.save_pretrained(path)
    return path


def _run(pipe, **kw):
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "seed": 1, **kw}
    return pipe("a red circle", **kw)


def test_seed_reproducible_and_generator_equivalent(pipe):
    a, b = _run(pipe, output_type="np").images, _run(pipe, output_type="np").images
    assert np.array_equal(a, b)
    c = pipe("a red circle", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
             output_type="np").images
    assert np.array_equal(a, c)
    assert not np.array_equal(a, _run(pipe, seed=2, output_type="np").images)


def test_batch_and_images_per_prompt(pipe):
    out = pipe(["a red circle", 'a sign that says "AB"'], height=64, width=96, num_inference_steps=2, seed=0,
               num_images_per_prompt=2)
    assert len(out.images) == 4 and out.images[0].size == (96, 64)
    assert out.prior_token_ids.shape == (2, 4 * 2 * 3)
    # images of one prompt share the AR tokens (as in the reference) but not the noise
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_callback_sees_every_step(pipe):
    seen = []
    _run(pipe, num_inference_steps=3, callback_on_step_end=lambda p, i, s, kw: seen.append((i, float(s))) or {})
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == 1.0


def test_image_to_image_batch(pipe):
    src = Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8))
    out = pipe(["edit a", "edit b"], image=[[src, src], [src, src]], height=64, width=64, num_inference_steps=2,
               seed=0)
    assert len(out.images) == 2


def test_offload_flag_keeps_results(pipe, folder):
    p = GlmImagePipeline.from_pretrained(folder, device="cpu", offload=True)
    p.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(p, output_type="np").images, _run(pipe, output_type="np").images)


def test_prompt_longer_than_context(pipe):
    with pytest.raises(ValueError, match="exceeds the model's context of 4096 tokens"):
        pipe("x" * 5000, height=64, width=64, num_inference_steps=1)


def test_cli_generate_info_and_errors(folder, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(out), "--height", "64", "--width",
                 "64", "--steps", "2", "-q"]) == 0
    assert Image.open(out).size == (64, 64)
    bad = tmp_path / "b.png"  # bad input of every kind: tests/test_bad_input.py
    assert main(["generate", "x", "--model", str(folder), "-o", str(bad), "--height", "70", "-q"]) == 2
    assert "height=70 is not a size this model draws: it must be a multiple of 32" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.glob(".*tmp"))
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "transformer" in text and "total" in text


def test_cli_help_for_every_subcommand():
    for argv in (["--help"], ["generate", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0


def test_compact_id_layout_round_trip(tmp_path):
    """Small models can drop the 168064-row embedding: codebook, image start/end, text bytes and specials
    packed at low ids. The tokenizer, sampler (grids use only codebook ids), export and reload follow."""
    from glimage.config import PRESETS, replace
    from glimage.prompt import GlmTokenizer
    cfg = replace(PRESETS["tiny"], **{
        "ar.vq.num_embeddings": 1024, "ar.image_start_token_id": 1024, "ar.image_end_token_id": 1025,
        "ar.text.vision_vocab_size": 1032, "ar.text_token_offset": 1032, "ar.grid_bos_token_id": 1288,
        "ar.grid_eos_token_id": 1289, "ar.image_token_id": 1290, "ar.text.pad_token_id": 1291,
        "ar.text.eos_token_id": 1025, "ar.text.vocab_size": 1292, "dit.prior_vq_quantizer_codebook_size": 1024})
    pipe = GlmImagePipeline.from_config(cfg, seed=0, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.ar.language_model.embed_tokens.weight.shape[0] == 1292
    ids = GlmTokenizer.byte_level(cfg.ar).encode('a "HI"<sop>2 2<eop><|dit_token_16384|>')
    assert max(ids) < 1292 and ids[-1] == 1024 and 1288 in ids and 1289 in ids
    out = pipe('a sign that says "HI"', height=64, width=64, num_inference_steps=2, seed=0, output_type="np")
    assert int(out.prior_token_ids.max()) < 1024
    pipe.save_pretrained(tmp_path)
    again = GlmImagePipeline.from_pretrained(tmp_path, device="cpu")
    again.set_progress_bar_config(disable=True)
    assert again.ar.cfg == pipe.ar.cfg
    assert np.array_equal(again('a sign that says "HI"', height=64, width=64, num_inference_steps=2, seed=0,
                                output_type="np").images, out.images)
    with pytest.raises(ValueError, match="collide"):
        replace(cfg, **{"ar.grid_bos_token_id": 1100})


def test_call_leaves_global_rng_untouched(pipe):
    """The reference re-seeds torch's global RNG in its AR stage; we draw from private generators only."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _run(pipe)
    pipe("x", height=64, width=64, num_inference_steps=1)  # no seed: fresh entropy, still no global draw
    assert torch.equal(torch.rand(3), expected)


def test_auto_dtype_and_cpu_layout_follow_the_cpu(monkeypatch):
    """`auto` on the CPU: bf16 only for a model stored in bf16 on a CPU with bf16 matrix units (AMX), fp32
    elsewhere; column-major AR weights only in fp32 (in bf16 that layout measured 1.6-2.2x slower)."""
    from glimage import device
    cpu = torch.device("cpu")
    for amx, stored, want in [(True, torch.bfloat16, torch.bfloat16), (False, torch.bfloat16, torch.float32),
                              (True, torch.float16, torch.float32), (True, None, torch.float32)]:
        monkeypatch.setattr(device, "cpu_has_bf16_matrix_units", lambda amx=amx: amx)
        assert device.resolve_dtype("auto", cpu, stored) == want
        assert device.resolve_dtype("float32", cpu, stored) == torch.float32
    for dtype, column_major in ((torch.float32, True), (torch.bfloat16, False)):
        p = GlmImagePipeline.from_pretrained(dtype=dtype)
        weights = [m.weight for m in p.ar.language_model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(w.t().is_contiguous() == column_major for w in weights)
