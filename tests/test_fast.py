"""The opt-in fast modes: they do what they say, and leave the exact path alone."""

import numpy as np
import pytest
import torch
from torch import nn

from glimage.fast import Int8Linear, StepCache
from glimage.pipeline import GlmImagePipeline
from glimage.validate import InputError


@pytest.fixture(scope="module")
def shipped():
    p = GlmImagePipeline.from_pretrained(device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64) / 255, np.asarray(b, np.float64) / 255
    return 10 * np.log10(1 / max(float(np.mean((a - b) ** 2)), 1e-10))


def test_step_cache_skips_blocks_and_stays_close(shipped):
    prompts = ["a red circle", "a blue square above a green circle"]
    exact = [shipped(p, seed=3).images[0] for p in prompts]
    cache = StepCache(shipped.dit, threshold=0.3).install()
    try:
        fast = [shipped(p, seed=3).images[0] for p in prompts]
    finally:
        cache.remove()
    assert cache.skipped > 0.3 * cache.steps  # measured: about half of the passes skip 5 of the 6 blocks
    assert min(psnr(a, b) for a, b in zip(exact, fast)) > 30  # measured 40-45 dB at 0.3
    again = shipped(prompts[0], seed=3).images[0]  # removed: the exact path, bit for bit
    assert np.array_equal(np.asarray(again), np.asarray(exact[0]))


def test_int8_linear_is_close_on_both_paths():
    torch.manual_seed(0)
    lin = nn.Linear(256, 512)
    q = Int8Linear(lin)
    for rows in (1, 4, 64):  # the int8 x bf16 kernel (decode) and the dequantised product (prefill)
        x = torch.randn(rows, 256)
        ref = lin(x)
        assert ((q(x) - ref).abs().max() / ref.abs().max()) < 0.02
    assert q.weight.dtype == torch.float32 and q.weight_int8.dtype == torch.int8


def test_ar_int8_pipeline_runs_and_refuses_to_save(tmp_path):
    pipe = GlmImagePipeline.from_config("tiny", seed=0, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_fast(ar_int8=True)
    out = pipe("a red circle", height=64, width=64, num_inference_steps=2, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    with pytest.raises(InputError, match="int8"):
        pipe.save_pretrained(tmp_path)
