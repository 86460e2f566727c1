"""GlmImageDiT against the reference GlmImageTransformer2DModel (tiny preset, random weights, fp32 CPU)."""

import dataclasses

import pytest
import torch

from glimage.config import PRESETS
from glimage.convert.dit import config_from_official, config_to_official, from_official, load_dit, save_dit, to_official
from glimage.models.dit import GlmImageDiT, RefKV

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ours(ref_dir):
    return load_dit(ref_dir / "transformer").eval()


@pytest.fixture(scope="module")
def ref(ref_pipe):
    return ref_pipe.transformer


def make_inputs(cfg, b=1, h=8, w=12, n_text=5, seed=0, t=999.0):
    """Denoising-pass inputs for latents (b, C, h, w); kwargs shared by our model and the reference."""
    g = torch.Generator().manual_seed(seed)
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    return dict(latents=torch.randn(b, cfg.in_channels, h, w, generator=g),
                glyph=torch.randn(b, n_text, cfg.text_embed_dim, generator=g),
                prior_token_id=torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (b, n), generator=g),
                prior_token_drop=torch.zeros(b, n, dtype=torch.bool),
                timestep=torch.full((b,), t), target_size=torch.tensor([[h * 8.0, w * 8.0]] * b),
                crop_coords=torch.zeros(b, 2))


def run_ref(ref, x, kv_caches=None):
    return ref(x["latents"], x["glyph"], x["prior_token_id"], x["prior_token_drop"], x["timestep"],
               x["target_size"], x["crop_coords"], kv_caches=kv_caches, return_dict=False)[0]


def make_reference_image(cfg, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    return (torch.randn(1, cfg.in_channels, h, w, generator=g),
            torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, n), generator=g),
            torch.tensor([[h * 8, w * 8]]))  # int64 pixel size, like the pipeline's write pass


def ref_write(ref, kv_caches, samples):
    """The pipeline's write pass: per sample, one batch-1 forward per reference image, then next_sample()."""
    kv_caches.set_mode("write")
    for images in samples:
        for lat, ids, size in images:
            no_text = lat.new_zeros(1, 0, ref.config.text_embed_dim)
            ref(lat, no_text, ids[0], torch.zeros(ids.shape[1], dtype=torch.bool), torch.zeros(1), size,
                torch.zeros(1, 2), kv_caches=kv_caches)
        kv_caches.next_sample()


@torch.no_grad()
def test_conditional_matches_reference(ours, ref, tiny_cfg):
    x = make_inputs(tiny_cfg.dit, t=749.0)
    torch.testing.assert_close(ours(**x), run_ref(ref, x), **TOL)


@torch.no_grad()
def test_unconditional_matches_reference(ours, ref, tiny_cfg):
    x = make_inputs(tiny_cfg.dit, n_text=1, seed=1)
    x["prior_token_drop"][:] = True
    out = ours(**x)
    torch.testing.assert_close(out, run_ref(ref, x), **TOL)
    # dropping every prior token makes the output independent of the ids: exactly (the dropped embedding is
    # zeroed before the projector), so this compares the same computation twice
    x["prior_token_id"] = torch.zeros_like(x["prior_token_id"])
    torch.testing.assert_close(ours(**x), out, rtol=0, atol=0)


@torch.no_grad()
def test_partial_drop_and_no_text(ours, ref, tiny_cfg):
    x = make_inputs(tiny_cfg.dit, n_text=0, seed=2, t=0.0)
    x["prior_token_drop"][:, ::3] = True
    torch.testing.assert_close(ours(**x), run_ref(ref, x), **TOL)


@torch.no_grad()
def test_batch_equals_single_calls(ours, ref, tiny_cfg):
    x = make_inputs(tiny_cfg.dit, b=2, seed=3)
    x["timestep"] = torch.tensor([999.0, 124.0])
    x["prior_token_drop"][1] = True
    out = ours(**x)
    torch.testing.assert_close(out, run_ref(ref, x), **TOL)
    for i in range(2):
        xi = {k: v[i:i + 1] for k, v in x.items()}
        torch.testing.assert_close(out[i:i + 1], ours(**xi), **TOL)


@pytest.mark.parametrize("sizes", [[(8, 8)], [(8, 8), (4, 12)]], ids=["one_ref", "two_refs"])
@torch.no_grad()
def test_reference_kv_write_read_skip(ours, ref, tiny_cfg, sizes):
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    cfg = tiny_cfg.dit
    images = [make_reference_image(cfg, h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    caches = GlmImageKVCache(cfg.num_layers)
    ref_write(ref, caches, [images])

    kv = RefKV.concat([ours.encode_reference(*im) for im in images])
    assert len(kv.k) == cfg.num_layers and kv.seq_len == sum(h * w // 4 for h, w in sizes)
    for layer, cache in enumerate(caches.caches):  # the stored K/V themselves (post-QK-norm, post-RoPE)
        torch.testing.assert_close(kv.k[layer], cache.k_caches[0], **TOL)
        torch.testing.assert_close(kv.v[layer], cache.v_caches[0], **TOL)

    x = make_inputs(cfg, seed=4)
    caches.set_mode("read")
    cond = ours(**x, kv=kv)
    torch.testing.assert_close(cond, run_ref(ref, x, caches), **TOL)
    assert not torch.allclose(cond, ours(**x), atol=1e-3)  # the references do change the output

    u = make_inputs(cfg, n_text=1, seed=5)
    u["prior_token_drop"][:] = True
    caches.set_mode("skip")
    torch.testing.assert_close(ours(**u), run_ref(ref, u, caches), **TOL)

    # one sample's references serve a batch of 2 (expanded), like GlmImageLayerKVCache.get
    x2 = make_inputs(cfg, b=2, seed=6)
    caches.set_mode("read")
    torch.testing.assert_close(ours(**x2, kv=kv), run_ref(ref, x2, caches), **TOL)


@torch.no_grad()
def test_reference_kv_per_sample_batch(ours, ref, tiny_cfg):
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    cfg = tiny_cfg.dit
    samples = [[make_reference_image(cfg, 8, 8, seed=20)], [make_reference_image(cfg, 8, 8, seed=21)]]
    caches = GlmImageKVCache(cfg.num_layers)
    ref_write(ref, caches, samples)
    per_sample = [ours.encode_reference(*s[0]) for s in samples]
    kv = RefKV.stack(per_sample)
    x = make_inputs(cfg, b=2, seed=7)
    caches.set_mode("read")
    out = ours(**x, kv=kv)
    torch.testing.assert_close(out, run_ref(ref, x, caches), **TOL)
    for i in range(2):
        xi = {k: v[i:i + 1] for k, v in x.items()}
        torch.testing.assert_close(out[i:i + 1], ours(**xi, kv=per_sample[i]), **TOL)
    with pytest.raises(ValueError, match="multiple of 2"):
        ours(**make_inputs(cfg, b=3), kv=kv)


@torch.no_grad()
def test_glyph_mask_batches_branches_of_different_length(ours, tiny_cfg):
    """cond (5 glyph tokens) and uncond (1 token, padded to 5 and masked) in one batch = two separate calls."""
    cfg = tiny_cfg.dit
    c = make_inputs(cfg, seed=8)
    u = make_inputs(cfg, n_text=1, seed=8)
    u["prior_token_drop"][:] = True
    kv = ours.encode_reference(*make_reference_image(cfg, 8, 8, seed=30))
    both = {k: torch.cat([c[k], u[k]]) for k in c if k != "glyph"}
    both["glyph"] = torch.cat([c["glyph"], torch.cat([u["glyph"], torch.randn(1, 4, cfg.text_embed_dim)], 1)])
    mask = torch.tensor([[True] * 5, [True] + [False] * 4])
    out = ours(**both, glyph_mask=mask)
    torch.testing.assert_close(out[:1], ours(**c), **TOL)
    torch.testing.assert_close(out[1:], ours(**u), **TOL)
    out = ours(**both, glyph_mask=mask, kv=kv)  # references shared by both rows
    torch.testing.assert_close(out[:1], ours(**c, kv=kv), **TOL)
    torch.testing.assert_close(out[1:], ours(**u, kv=kv), **TOL)


@torch.no_grad()
def test_bf16_matches_reference(ref, ref_dir, tiny_cfg):
    """Same precision choices as the reference (fp32 RoPE, sinusoids; LayerNorm outputs cast back)."""
    import copy

    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache
    cfg = tiny_cfg.dit
    ours = load_dit(ref_dir / "transformer", dtype=torch.bfloat16)
    ref = copy.deepcopy(ref).to(torch.bfloat16)
    x = {k: v.bfloat16() if k in ("latents", "glyph") else v for k, v in make_inputs(cfg, seed=12).items()}
    out = ours(**x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, run_ref(ref, x))
    lat, ids, size = make_reference_image(cfg, 8, 8, seed=50)
    caches = GlmImageKVCache(cfg.num_layers)
    ref_write(ref, caches, [[(lat.bfloat16(), ids, size)]])
    caches.set_mode("read")
    torch.testing.assert_close(ours(**x, kv=ours.encode_reference(lat.bfloat16(), ids, size)), run_ref(ref, x, caches))


def test_gradients_finite_on_all_params(ref_dir, tiny_cfg):
    model = load_dit(ref_dir / "transformer").train()
    cfg = tiny_cfg.dit
    kv = model.encode_reference(*make_reference_image(cfg, 8, 8, seed=40))
    x = make_inputs(cfg, b=2, seed=9)
    x["prior_token_drop"][1, :7] = True
    loss = (model(**x, kv=kv) - torch.randn(2, cfg.out_channels, 8, 12)).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.proj_out.weight.grad.abs().sum() > 0 and model.prior_token_embedding.weight.grad.abs().sum() > 0


def test_runs_on_meta_device(tiny_cfg):
    """Every constant (RoPE, sinusoids, masks) is built on the input's device: no CPU tensor, no host sync."""
    cfg = tiny_cfg.dit
    with torch.device("meta"):
        model = GlmImageDiT(cfg)
    # run outside the device context, so that a constant created without device= would land on the CPU and fail
    meta = torch.device("meta")
    x = {k: v.to(meta) for k, v in make_inputs(cfg, b=2).items()}
    ref = make_reference_image(cfg, 8, 8, seed=0)
    kv = model.encode_reference(*(t.to(meta) for t in ref))
    out = model(**x, kv=kv, glyph_mask=torch.ones(2, 5, dtype=torch.bool, device=meta))
    assert out.device.type == "meta" and out.shape == (2, cfg.out_channels, 8, 12)


def test_bad_inputs_raise(ours, tiny_cfg):
    cfg = tiny_cfg.dit
    x = make_inputs(cfg)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ours(**{**x, "latents": torch.randn(1, cfg.in_channels, 7, 12)})
    with pytest.raises(ValueError, match="prior_token_id"):
        ours(**{**x, "prior_token_id": x["prior_token_id"][:, :-1]})
    with pytest.raises(ValueError, match="glyph"):
        ours(**{**x, "glyph": torch.randn(1, 5, cfg.text_embed_dim + 1)})
    with pytest.raises(ValueError, match="target_size"):
        ours(**{**x, "target_size": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="multiple of 4"):
        GlmImageDiT(dataclasses.replace(cfg, attention_head_dim=6))


def test_official_layout_and_param_count():
    from diffusers import GlmImageTransformer2DModel
    cfg = PRESETS["glm-image"].dit
    official = config_to_official(cfg)
    assert config_from_official(official) == cfg
    with torch.device("meta"):
        ours = GlmImageDiT(cfg)
        ref = GlmImageTransformer2DModel(**{k: v for k, v in official.items() if not k.startswith("_")})
    ours_shapes = {k: tuple(v.shape) for k, v in to_official(ours.state_dict()).items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 443
    assert sum(p.numel() for p in ours.parameters()) == 6_926_882_880


def test_config_defaults_follow_reference():
    # a config.json without a key means the reference constructor's default, not GLM-Image's value
    assert config_from_official({"_class_name": "GlmImageTransformer2DModel"}).attention_head_dim == 40
    with pytest.raises(ValueError, match="GlmImageTransformer2DModel"):
        config_from_official({"_class_name": "CogView4Transformer2DModel"})
    with pytest.raises(ValueError, match="num_layers"):
        config_from_official({"num_layers": 0})


@torch.no_grad()
def test_round_trip_with_reference(ours, ref, ref_dir, tiny_cfg, tmp_path):
    from diffusers import GlmImageTransformer2DModel

    from glimage.checkpoint import read_state_dict
    sd = read_state_dict(ref_dir / "transformer")
    back = to_official(from_official(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert config_from_official(ref.config) == tiny_cfg.dit

    save_dit(ours, tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = GlmImageTransformer2DModel.from_pretrained(tmp_path).eval()
    x = make_inputs(tiny_cfg.dit, seed=11)
    # another implementation (diffusers): within the parity tolerance, never exactly (kernels differ by CPU;
    # 1.8e-7 was measured on one machine of CI's kind)
    torch.testing.assert_close(run_ref(reloaded, x), ours(**x), **TOL)
    # the same code on the same weights in one process: bit-identical by construction
    torch.testing.assert_close(load_dit(tmp_path)(**x), ours(**x), rtol=0, atol=0)
