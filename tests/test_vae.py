"""AutoencoderKL: parity with diffusers' AutoencoderKL (the reference pipeline's `vae`), layout, conversion."""

import dataclasses

import pytest
import torch

from glimage.config import PRESETS, VAEConfig
from glimage.convert.vae import (config_from_official, config_to_official, from_official, load_vae, save_vae,
                                 to_official)
from glimage.models.vae import AutoencoderKL

RefVAE = pytest.importorskip("diffusers").AutoencoderKL


def ref_kwargs(cfg: VAEConfig) -> dict:
    return {k: v for k, v in config_to_official(cfg).items() if not k.startswith("_")}


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def vae(ref_dir):
    return load_vae(ref_dir / "vae")


def test_config_read_from_folder(vae, ref_pipe, tiny_cfg):
    assert vae.cfg == tiny_cfg.vae  # latents_mean/std come from vae/config.json
    assert list(vae.cfg.latents_mean) == list(ref_pipe.vae.config.latents_mean)
    assert config_from_official(config_to_official(tiny_cfg.vae)) == tiny_cfg.vae


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 48, 80), (1, 3, 36, 52)])  # last: not a multiple of 8
@torch.no_grad()
def test_encode_parity(vae, ref_pipe, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = ref_pipe.vae.encode(x).latent_dist
    post = vae.encode(x)
    mean, logvar = post  # unpacks like a (mean, logvar) pair
    close(mean, ref.mean)
    close(logvar, ref.logvar)
    close(post.mode(), ref.mode())
    close(post.std, ref.std)
    close(post.kl(), ref.kl())
    # sampling consumes the generator exactly like diffusers' randn_tensor
    close(post.sample(torch.Generator().manual_seed(7)), ref.sample(torch.Generator().manual_seed(7)))
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(shape[0])]  # noqa: E731
    close(post.sample(gens()), ref.sample(gens()))


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 6, 10)])
@torch.no_grad()
def test_decode_parity(vae, ref_pipe, shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    close(vae.decode(z), ref_pipe.vae.decode(z).sample)
    # forward = encode -> mode -> decode, as diffusers' forward(sample_posterior=False)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    close(vae(x), ref_pipe.vae(x).sample)


@torch.no_grad()
def test_latent_normalization_matches_pipeline(vae, ref_pipe):
    """The pipeline's i2i encode `(z - mean) / std` and its final decode `z * std + mean` (pipeline_glm_image)."""
    C = ref_pipe.vae.config.latent_channels
    mean = torch.tensor(ref_pipe.vae.config.latents_mean).view(1, C, 1, 1)
    std = torch.tensor(ref_pipe.vae.config.latents_std).view(1, C, 1, 1)
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref_z = (ref_pipe.vae.encode(x).latent_dist.mode() - mean) / std
    z = vae.normalize_latents(vae.encode(x).mode())
    close(z, ref_z)
    noise = torch.randn(1, C, 8, 6, generator=torch.Generator().manual_seed(4))
    close(vae.decode(vae.denormalize_latents(noise)), ref_pipe.vae.decode(noise * std + mean).sample)
    close(vae.denormalize_latents(vae.normalize_latents(noise)), noise)
    ident = AutoencoderKL(dataclasses.replace(vae.cfg, latents_mean=None, latents_std=None))
    assert torch.equal(ident.normalize_latents(noise), noise) and torch.equal(ident.denormalize_latents(noise), noise)


@torch.no_grad()
def test_mid_block_attention_variant(tmp_path, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.vae, mid_block_add_attention=True, block_out_channels=(8, 16))
    torch.manual_seed(0)
    ref = RefVAE(**ref_kwargs(cfg)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_vae(tmp_path)
    assert any("attentions.0.to_out.0" in k for k in ours.state_dict())
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    close(ours.encode(x).mean, ref.encode(x).latent_dist.mean)
    close(ours(x), ref(x).sample)


def test_official_layout_on_meta():
    cfg = PRESETS["glm-image"].vae
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = RefVAE(**ref_kwargs(cfg))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(shapes) == 288
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 406_100_643


def test_round_trip(vae, ref_dir, tmp_path):
    from glimage.checkpoint import read_state_dict

    sd = read_state_dict(ref_dir / "vae")
    back = to_official(from_official(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    save_vae(vae, tmp_path)
    ref = RefVAE.from_pretrained(tmp_path).eval()
    assert list(ref.config.latents_mean) == list(vae.cfg.latents_mean)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        close(vae(x), ref(x).sample, tol=0)
    assert load_vae(tmp_path).cfg == vae.cfg


def test_bad_inputs_and_configs(vae, tiny_cfg):
    with pytest.raises(ValueError, match="expected images"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="latents_mean"):
        AutoencoderKL(dataclasses.replace(tiny_cfg.vae, latents_mean=(0.0,)))
    good = config_to_official(tiny_cfg.vae)
    for key, value in [("use_quant_conv", True), ("act_fn", "gelu"), ("down_block_types", ["DownBlock2D"] * 4)]:
        with pytest.raises(ValueError, match=key):
            config_from_official({**good, key: value})
    bad = dict(good)
    del bad["use_post_quant_conv"]  # diffusers' default (True) would add a post_quant_conv
    with pytest.raises(ValueError, match="use_post_quant_conv"):
        config_from_official(bad)


def test_trainable(tiny_cfg):
    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_cfg.vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    post = vae.encode(x)
    loss = (vae.decode(post.sample(torch.Generator().manual_seed(0))) - x).pow(2).mean() + post.kl().mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
