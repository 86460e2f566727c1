"""The AR half against the reference (transformers 5.23 + diffusers 0.42.1) on the tiny preset, fp32 CPU."""

import pytest
import torch

from glimage.convert.ar import load_ar, read_ar_config
from glimage.pipeline import GlmImagePipeline
from glimage.prior import tokenize_sources
from glimage.prompt import GlmTokenizer, build_prompts
from reference import SEED, random_image, reference_prompt_inputs

T2I = ['A red sign that says "OPEN 24h" on a brick wall']
T2I_BATCH = ["a cat", 'A poster with the words "GLM" and a much longer description of the scene']
I2I = ["Make it look like a watercolor painting"]


@pytest.fixture(scope="module")
def ours(ref_dir):
    return GlmImagePipeline.from_pretrained(ref_dir, device="cpu", dtype=torch.float32)


def _ref_positions(ref_pipe, inputs):
    vle = ref_pipe.vision_language_encoder
    pos, _ = vle.model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["images_per_sample"],
                                      inputs["attention_mask"])
    dec = vle.model._cached_decode_position_ids
    vle.model.rope_deltas = None
    return pos, dec


def _source_grids(inputs, n_src):
    grids = inputs["image_grid_thw"].view(-1, n_src + 1, 3)[:, :n_src, 1:]
    return [[tuple(g.tolist()) for g in row] for row in grids]


def test_config_read_from_folder(ref_dir, tiny_cfg):
    cfg = read_ar_config(ref_dir)
    assert cfg.text == tiny_cfg.ar.text and cfg.vision == tiny_cfg.ar.vision and cfg.vq == tiny_cfg.ar.vq
    assert (cfg.source_min_pixels, cfg.source_max_pixels) == (tiny_cfg.ar.source_min_pixels,
                                                              tiny_cfg.ar.source_max_pixels)
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.9, 50, 0.75)


@pytest.mark.parametrize("prompts,h,w", [(T2I, 64, 96), (T2I_BATCH, 96, 64)])
def test_t2i_ids_positions_logits(ref_pipe, ours, prompts, h, w):
    inputs = reference_prompt_inputs(ref_pipe, prompts, h, w)
    batch = build_prompts(prompts, h, w, ours.tokenizer, ours.ar.cfg)
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    assert torch.equal(batch.attention_mask, inputs["attention_mask"])
    pos, dec = _ref_positions(ref_pipe, inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(batch.position_ids[:, valid], pos[:, valid])
    assert torch.equal(batch.decode_position_ids, dec)
    with torch.no_grad():
        ref = ref_pipe.vision_language_encoder(**inputs).logits
        ref_pipe.vision_language_encoder.model.rope_deltas = None
        from glimage.sampling import prefill_mask
        got = ours.ar(batch.input_ids, batch.position_ids, prefill_mask(batch.attention_mask, batch.input_ids.shape[1]))
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompts,h,w", [(T2I, 64, 96), (T2I_BATCH, 64, 64)])
def test_t2i_generated_tokens_identical(ref_pipe, ours, prompts, h, w):
    ref = ref_pipe.generate_prior_tokens(prompt=prompts, height=h, width=w,
                                         generator=torch.Generator().manual_seed(SEED), device=torch.device("cpu"))[0]
    ours.set_progress_bar_config(disable=True)
    got = ours.generate_prior_tokens(prompts, h, w, generator=torch.Generator().manual_seed(SEED))
    assert got.shape == (len(prompts), 4 * (h // 32) * (w // 32))
    assert torch.equal(got, ref)


def _sources(n_prompts, n_src, sizes):
    return [[random_image(*sizes[(b * n_src + i) % len(sizes)], seed=SEED + 7 * b + i) for i in range(n_src)]
            for b in range(n_prompts)]


@pytest.mark.parametrize("prompts,n_src,h,w", [(I2I, 1, 64, 64), (I2I, 2, 64, 96),
                                               (["edit one", "a much longer edit instruction"], 1, 64, 64)])
def test_i2i_vq_ids_positions_and_tokens(ref_pipe, ours, prompts, n_src, h, w):
    images = _sources(len(prompts), n_src, [(64, 64), (96, 64), (64, 128)])
    inputs = reference_prompt_inputs(ref_pipe, prompts, h, w, images)
    vle = ref_pipe.vision_language_encoder
    # VQ ids of the source images: identical
    with torch.no_grad():
        feats = vle.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                       inputs["images_per_sample"]).pooler_output
        ref_ids = [vle.model.vqmodel.encode(f[None]).image_tokens for f in feats]
    got_ids = [g.flatten() for row in tokenize_sources(ours.ar, images) for g in row]
    assert len(got_ids) == len(ref_ids)
    for a, b in zip(got_ids, ref_ids):
        assert torch.equal(a, b)
    # prompt ids (placeholders) and positions
    batch = build_prompts(prompts, h, w, ours.tokenizer, ours.ar.cfg, _source_grids(inputs, n_src))
    assert torch.equal(batch.input_ids, inputs["input_ids"])
    pos, dec = _ref_positions(ref_pipe, inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(batch.position_ids[:, valid], pos[:, valid])
    assert torch.equal(batch.decode_position_ids, dec)
    # generated tokens for the same seed. The reference pipeline's own generate_prior_tokens crashes on
    # source images of different sizes (torch.cat of unequal VQ maps), so call its generate() as it does.
    th, tw = h // 32, w // 32
    torch.manual_seed(SEED)
    with torch.no_grad():
        seq = vle.generate(**inputs, max_new_tokens=th * tw + 1, do_sample=True)
    vle.model.rope_deltas = None
    ref = seq[:, inputs["input_ids"].shape[1]:][:, :th * tw]
    ref = ref.view(-1, th, tw).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(len(prompts), -1)
    img_arg = images if len(prompts) > 1 else images[0]
    got = ours.generate_prior_tokens(prompts, h, w, image=img_arg, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(got, ref)


def test_tokenizer_special_ids(ref_dir):
    tok = GlmTokenizer.from_folder(ref_dir / "processor")
    assert (tok.image_start_id, tok.image_end_id, tok.image_id, tok.pad_id) == (16384, 16385, 167855, 167841)
    assert (tok.grid_bos_id, tok.grid_eos_id) == (167845, 167846)


def test_load_through_loader_matches_reference_weights(ref_pipe, ref_dir):
    ar = load_ar(ref_dir)
    ref_sd = ref_pipe.vision_language_encoder.state_dict()
    ours = {("model." + k if not k.startswith("lm_head") else k): v for k, v in ar.state_dict().items()}
    assert set(ours) == set(ref_sd)
    for k in ref_sd:
        assert torch.equal(ours[k], ref_sd[k]), k
