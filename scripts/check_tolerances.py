"""The reference implementation's own bf16 error, per component, on exactly what `glimage check` runs.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/check_tolerances.py [--dtype=float16] [ar vision glyph dit vae]

For each component of `glimage.check.components()` (preset slice: the official widths, seeded weights, fixed
inputs) our fp32 module's weights go into the reference module (transformers 5.23 / diffusers 0.42.1), which
then runs in fp32 and, after `.to(torch.bfloat16)` with the inputs cast as check's `_cast` does, in bf16.
Printed per component:
    ref bf16 err   rel_error(reference bf16, reference fp32)  -- the reference's own bf16 error
    ref~ours fp32  rel_error(reference fp32, glimage fp32)    -- proves the mapping and inputs (~1e-6)
`glimage check --dtype bfloat16` measures the first quantity for glimage; its tolerances can be set from it.

How the weights reach the reference:
- ar: transformers GlmImageTextModel built on meta from the text config glimage's convert.ar writes, given our
  language_model tensors (the reference's names minus `model.language_model.`); the head is the reference's
  plain nn.Linear `lm_head` with our weight.
- vision: GlmImageVisionModel the same way (`model.visual.`); the image goes in as the processor packs it
  (one row of C*p*p values per patch, row-major, grid_thw [[1, gh, gw]]).
- glyph, dit, vae: saved with glimage's own save_glyph_encoder / save_dit / save_vae and loaded with
  T5EncoderModel / GlmImageTransformer2DModel / AutoencoderKL .from_pretrained.
Peak memory about 7 GB (the AR); one thread.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from glimage.check import _cast, components, rel_error
from glimage.config import get_preset

PRESET = "slice"


def meta_built(cls, config, state_dict):
    """cls(config) without a random init, holding `state_dict`'s tensors (strict); non-persistent buffers
    (the text rope's inv_freq) are rebuilt for real."""
    with torch.device("meta"):
        m = cls(config)
    m.load_state_dict(state_dict, strict=True, assign=True)
    if hasattr(m, "rotary_emb"):
        m.rotary_emb = type(m.rotary_emb)(config)
    assert not any(t.is_meta for t in [*m.parameters(), *m.buffers()])
    return m.eval()


def reference(name: str, ours, tmp: Path):
    """-> (reference module in fp32, run(module, inputs) -> tensor shaped like ours)."""
    cfg = get_preset(PRESET)
    if name == "ar":
        from transformers import GlmImageTextConfig, GlmImageTextModel

        from glimage.convert.ar import config_to_official
        text = GlmImageTextConfig(**config_to_official(cfg.ar)["text_config"])
        ref = torch.nn.Module()
        ref.language_model = meta_built(GlmImageTextModel, text, ours.language_model.state_dict())
        ref.lm_head = ours.lm_head  # the reference's lm_head is this same nn.Linear (no bias)

        def run(m, x):
            h = m.language_model(input_ids=x["ids"], position_ids=x["pos"], use_cache=False).last_hidden_state
            return m.lm_head(h)
        return ref, run
    if name == "vision":
        from transformers import GlmImageVisionConfig, GlmImageVisionModel

        from glimage.convert.ar import config_to_official
        vcfg = GlmImageVisionConfig(**config_to_official(cfg.ar)["vision_config"])
        ref = meta_built(GlmImageVisionModel, vcfg, ours.state_dict())
        p = vcfg.patch_size

        def run(m, x):
            px = x["pixels"][0]
            C, H, W = px.shape
            gh, gw = H // p, W // p
            packed = px.reshape(C, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, C * p * p)
            y = m(pixel_values=packed, grid_thw=torch.tensor([[1, gh, gw]])).last_hidden_state  # (N, C')
            return y.t().reshape(1, -1, gh, gw)
        return ref, run
    if name == "glyph":
        from transformers import T5EncoderModel

        from glimage.convert.glyph import save_glyph_encoder
        save_glyph_encoder(ours, tmp / "text_encoder")
        ref = T5EncoderModel.from_pretrained(tmp / "text_encoder").eval()
        return ref, lambda m, x: m(input_ids=x["ids"]).last_hidden_state
    if name == "dit":
        from diffusers import GlmImageTransformer2DModel

        from glimage.convert.dit import save_dit
        save_dit(ours, tmp / "transformer")
        ref = GlmImageTransformer2DModel.from_pretrained(tmp / "transformer").eval()
        return ref, lambda m, x: m(x["latents"], x["glyph"], x["prior_token_id"], x["prior_token_drop"],
                                   x["timestep"], x["target_size"], x["crop_coords"], return_dict=False)[0]
    if name == "vae":
        from diffusers import AutoencoderKL

        from glimage.convert.vae import save_vae
        save_vae(ours, tmp / "vae")
        ref = AutoencoderKL.from_pretrained(tmp / "vae").eval()
        return ref, lambda m, x: m.decode(x["z"]).sample
    raise ValueError(name)


@torch.no_grad()
def measure(c, dtype=torch.bfloat16) -> dict:
    t0 = time.perf_counter()
    ours, x = c.build(), c.inputs()
    y_ours = c.run(ours, x)
    with tempfile.TemporaryDirectory() as tmp:
        ref, run = reference(c.name, ours, Path(tmp))
        del ours
        gc.collect()
        truth = run(ref, x)
        ref = ref.to(dtype)
        gc.collect()
        y16 = run(ref, _cast(x, torch.device("cpu"), dtype))
    row = dict(component=c.name, reference=type(ref.language_model if c.name == "ar" else ref).__name__,
               ref_bf16=rel_error(y16, truth), ref_vs_ours_fp32=rel_error(truth, y_ours),
               finite=bool(torch.isfinite(y16).all()), seconds=time.perf_counter() - t0)
    del ref, truth, y16, y_ours
    gc.collect()
    return row


def main(only: list[str]) -> None:
    """only: component names; a leading --dtype=float16 measures fp16 instead of bf16 (untried: slow on CPUs
    without fp16 units, and T5's wo, which the reference keeps in fp32 when loaded in fp16, is cast here)."""
    dtype = torch.bfloat16
    if only and only[0].startswith("--dtype="):
        dtype = getattr(torch, only.pop(0).split("=", 1)[1])
    torch.set_num_threads(1)
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()
    print(f"{'component':10s} {'ref ' + str(dtype)[6:] + ' err':>13s} {'1.25x':>9s} {'ref~ours fp32':>14s} {'seconds':>8s}  reference",
          flush=True)
    for c in components(PRESET):
        if only and c.name not in only:
            continue
        r = measure(c, dtype)
        print(f"{r['component']:10s} {r['ref_bf16']:13.3e} {1.25 * r['ref_bf16']:9.2e} {r['ref_vs_ours_fp32']:14.2e} "
              f"{r['seconds']:8.1f}  {r['reference']}{'' if r['finite'] else '  NON-FINITE'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
