"""End to end against the reference pipeline on the tiny preset: same weights and seed -> same image."""

import numpy as np
import pytest
import torch
from reference import SEED, random_image

from glimage.pipeline import GlmImagePipeline

T2I = dict(prompt='A red sign that says "OPEN 24h" on a brick wall', height=64, width=96)


@pytest.fixture(scope="module")
def ours(ref_dir):
    pipe = GlmImagePipeline.from_pretrained(ref_dir, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ref(ref_pipe, **kw):
    return ref_pipe(num_inference_steps=4, guidance_scale=1.5, generator=torch.Generator().manual_seed(SEED),
                    output_type="np", **kw).images


def _ours(pipe, **kw):
    return pipe(num_inference_steps=4, guidance_scale=1.5, generator=torch.Generator().manual_seed(SEED),
                output_type="np", **kw).images


def test_t2i_image_matches_reference(ref_pipe, ours):
    ref, got = _ref(ref_pipe, **T2I), _ours(ours, **T2I)
    assert got.shape == ref.shape == (1, 64, 96, 3)
    assert np.abs(got - ref).max() <= 1 / 255


@pytest.mark.parametrize("height,width", [(32, 64), (64, 288)])
def test_sizes_the_reference_draws_are_drawn_alike(ref_pipe, ours, height, width):
    """glimage refuses only what cannot work: sizes outside the vision encoder's table (256 px here) or below
    a quarter of it, which an earlier glimage refused, are drawn as the reference draws them."""
    kw = dict(prompt="a red circle", height=height, width=width)
    ref, got = _ref(ref_pipe, **kw), _ours(ours, **kw)
    assert got.shape == ref.shape == (1, height, width, 3)
    assert np.abs(got - ref).max() <= 1 / 255


@pytest.mark.parametrize("n_src", [1, 2])
def test_i2i_image_matches_reference(ref_pipe, ours, n_src):
    images = [random_image(64, 64, seed=SEED + i) for i in range(n_src)]
    kw = dict(prompt="Make it look like a watercolor painting", height=64, width=64, image=images)
    ref, got = _ref(ref_pipe, **kw), _ours(ours, **kw)
    assert got.shape == ref.shape == (1, 64, 64, 3)
    assert np.abs(got - ref).max() <= 1 / 255


def test_save_pretrained_round_trip_loads_in_reference(ref_pipe, ours, tmp_path):
    """Our save_pretrained writes the official layout: the reference loads it and draws the same image."""
    from diffusers import GlmImagePipeline as RefPipeline
    from reference import patch_i2i_version_skew
    ours.save_pretrained(tmp_path)
    ref2 = RefPipeline.from_pretrained(tmp_path)
    ref2.set_progress_bar_config(disable=True)
    patch_i2i_version_skew(ref2.vision_language_encoder)
    again = GlmImagePipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    again.set_progress_bar_config(disable=True)
    ref_img, got = _ref(ref2, **T2I), _ours(again, **T2I)
    assert np.abs(got - ref_img).max() <= 1 / 255
    assert np.abs(got - _ref(ref_pipe, **T2I)).max() <= 1 / 255


def test_compiled_path_matches_eager_and_reference(ref_pipe, ref_dir):
    """enable_compile(): the static-shape AR decode step and the DiT blocks under torch.compile draw the eager
    path's tokens, and an image within the parity tolerance of the reference's."""
    pipe = GlmImagePipeline.from_pretrained(ref_dir, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    eager = _ours(pipe, **T2I)
    eager_ids = pipe.generate_prior_tokens(T2I["prompt"], T2I["height"], T2I["width"], seed=SEED)
    pipe.enable_compile()
    assert torch.equal(pipe.generate_prior_tokens(T2I["prompt"], T2I["height"], T2I["width"], seed=SEED), eager_ids)
    got = _ours(pipe, **T2I)
    assert np.abs(got - eager).max() <= 1e-5
    assert np.abs(got - _ref(ref_pipe, **T2I)).max() <= 1 / 255
