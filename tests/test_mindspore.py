"""The MindSpore backend against the PyTorch path: every component with the same weights (fp32, CPU), strict
loading of the official folder, and whole generations (same seed -> same prior tokens, image within 1/255).

Runs where MindSpore is installed (CI: its own environment, see .ci/run); skipped elsewhere. Tolerances: 1e-5
of the output's scale (max(1, max |y|)), measured at 5e-7 .. 8e-6 here; ids and tokens exactly equal.
"""

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")

import glimage  # noqa: E402
from glimage.checkpoint import CheckpointError, read_arrays  # noqa: E402
from glimage.mindspore.bridge import to_torch  # noqa: E402
from glimage.mindspore.layers import to_ms  # noqa: E402
from glimage.mindspore.pipeline import MindSporePipeline  # noqa: E402
from glimage.mindspore.weights import state_arrays  # noqa: E402
from glimage.pipeline import DEFAULT_MODEL, GlmImagePipeline  # noqa: E402
from glimage.sampling import prefill_mask  # noqa: E402

TOL = 1e-5


def close(ref: torch.Tensor, got, tol: float = TOL) -> float:
    got = to_torch(got) if isinstance(got, ms.Tensor) else got
    ref = ref.detach().float()
    assert tuple(ref.shape) == tuple(got.shape)
    err = float((ref - got.float()).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), err
    return err


def m(x: torch.Tensor):
    return to_ms(x.detach().numpy())


@pytest.fixture(scope="module")
def pipes():
    tp = GlmImagePipeline.from_config("tiny", seed=0)
    return tp, MindSporePipeline.from_torch(tp, device="cpu")


@torch.no_grad()
def test_ar_prefill_and_cached_decode(pipes):
    tp, mp = pipes
    tar, mar = tp.ar, mp.ar.model
    g = torch.Generator().manual_seed(0)
    B, L, n_new = 2, 10, 4
    ids = torch.randint(0, tar.cfg.text.vocab_size, (B, L + n_new), generator=g)
    pos = torch.arange(L + n_new).expand(3, B, -1).contiguous()
    close(tar(ids, pos), mar(m(ids), m(pos)))  # plain causal, whole sequence
    # left-padded prefill into the static cache, then one token at a time (the decode loop's calls)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[1, :3] = 0
    mask = prefill_mask(attn, L)
    tc, mc = tar.new_cache(B, L + n_new), mar.new_cache(B, L + n_new)
    close(tar(ids[:, :L], pos[:, :, :L], mask, tc, 0, last_only=True),
          mar(m(ids[:, :L]), m(pos[:, :, :L]), m(mask), mc, 0, True))
    valid = torch.cat([attn.bool(), torch.ones(B, n_new, dtype=torch.bool)], 1)
    for i in range(L, L + n_new):
        step_mask = valid[:, None, None, : i + 1]
        close(tar(ids[:, i:i + 1], pos[:, :, i:i + 1], step_mask, tc, i, last_only=True),
              mar(m(ids[:, i:i + 1]), m(pos[:, :, i:i + 1]), m(step_mask), mc, i, True))


@torch.no_grad()
def test_vision_encoder_and_vq_ids(pipes):
    tp, mp = pipes
    px = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    feats = tp.ar.visual(px)
    close(feats, mp.ar.model.visual(m(px)))
    assert torch.equal(tp.ar.image_ids(px), mp.ar.image_ids(px))  # through the bridge: exact ids


@torch.no_grad()
def test_glyph_encoder(pipes):
    tp, mp = pipes
    ids = torch.randint(3, 259, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    close(tp.glyph_encoder(ids, mask), mp.glyph_encoder.model(m(ids), m(mask)))
    close(tp.glyph_encoder(ids), mp.glyph_encoder.model(m(ids)))


@torch.no_grad()
def test_dit_with_masks_drops_and_reference_kv(pipes):
    tp, mp = pipes
    dit, cfg = tp.dit, tp.dit.cfg
    g = torch.Generator().manual_seed(3)
    B, h, w, T = 2, 8, 12, 5
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    lat = torch.randn(B, cfg.in_channels, h, w, generator=g)
    glyph = torch.randn(B, T, cfg.text_embed_dim, generator=g)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (B, n), generator=g)
    drop = torch.zeros(B, n, dtype=torch.bool)
    drop[1] = True
    drop[0, :3] = True
    t, size, crop = torch.tensor([999.0, 412.0]), torch.tensor([[64.0, 96.0]] * B), torch.zeros(B, 2)
    gmask = torch.ones(B, T, dtype=torch.bool)
    gmask[0, :2] = False
    close(dit(lat, glyph, prior, drop, t, size, crop, glyph_mask=gmask),
          mp.dit(lat, glyph, prior, drop, t, size, crop, glyph_mask=gmask))
    # image-to-image: the write pass, then the read pass with one reference shared by the batch
    ref_lat = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ref_ids = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (1, 16), generator=g)
    kv_t = dit.encode_reference(ref_lat, ref_ids, torch.tensor([[64.0, 64.0]]))
    kv_m = mp.dit.encode_reference(ref_lat, ref_ids, torch.tensor([[64.0, 64.0]]))
    for a, b in zip(kv_t.k + kv_t.v, kv_m.k + kv_m.v):
        close(a, b)
    close(dit(lat, glyph, prior, None, t, size, crop, kv=kv_t), mp.dit(lat, glyph, prior, None, t, size, crop, kv=kv_m))
    converted = mp.dit._refs[1]  # one shared reference repeated for the batch: copied to MindSpore once, not per step
    mp.dit(lat, glyph, prior, None, t, size, crop, kv=kv_m)
    assert mp.dit._refs[1] is converted


@torch.no_grad()
def test_vae_encode_decode(pipes):
    tp, mp = pipes
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    post_t, post_m = tp.vae.encode(x), mp.vae.encode(x)
    close(post_t.mean, post_m.mean)
    close(post_t.logvar, post_m.logvar)
    z = torch.randn(1, tp.vae.cfg.latent_channels, 8, 6, generator=g)
    close(tp.vae.decode(z), mp.vae.decode(z))
    close(tp.vae.normalize_latents(z), mp.vae.normalize_latents(z))


def test_official_folder_loads_strictly_without_torch(pipes, tmp_path):
    tp, _ = pipes
    tp.save_pretrained(tmp_path)
    mp = MindSporePipeline.from_pretrained(tmp_path, device="cpu")
    for mine, theirs in ((mp.ar, tp.ar), (mp.glyph_encoder, tp.glyph_encoder), (mp.dit, tp.dit), (mp.vae, tp.vae)):
        arrays, sd = state_arrays(mine.model), theirs.state_dict()
        assert sorted(arrays) == sorted(sd)
        for k, v in sd.items():
            assert np.array_equal(arrays[k], v.numpy()), k  # fp32 -> fp32: bit for bit
    # strict: a dropped tensor and a misshaped one are named
    from safetensors.torch import load_file, save_file
    f = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("proj_out.bias")
    sd["norm_out.linear.weight"] = sd["norm_out.linear.weight"][:, :-1].contiguous()
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): proj_out.bias.*misshaped.*norm_out.linear"):
        MindSporePipeline.from_pretrained(tmp_path, device="cpu")


def test_bf16_weights_read_exactly(tmp_path):
    from safetensors.torch import save_file
    t = {"a": torch.randn(5, 7).to(torch.bfloat16), "b": torch.arange(6).view(2, 3), "c": torch.randn(3).half()}
    save_file(t, tmp_path / "model.safetensors")
    arrays = read_arrays(tmp_path)
    for k, v in t.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()  # bf16 widened, others as stored
        assert arrays[k].dtype == want.dtype and np.array_equal(arrays[k], want), k
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        read_arrays(tmp_path)


@pytest.fixture(scope="module")
def shipped():
    tp = GlmImagePipeline.from_pretrained(DEFAULT_MODEL)
    mp = glimage.from_pretrained(DEFAULT_MODEL, device="cpu", backend="mindspore")
    for p in (tp, mp):
        p.set_progress_bar_config(disable=True)
    return tp, mp


@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_generation_same_tokens_and_image(shipped, mode):
    """End to end on the shipped model: the shared random source makes the backends differ only in their
    tensor programs, so the prior tokens are equal and the pixels within 1/255."""
    from PIL import Image
    tp, mp = shipped
    assert isinstance(mp, MindSporePipeline) and mp.backend == "mindspore"
    kw = dict(num_inference_steps=8)
    if mode == "i2i":
        src = Image.new("RGB", (128, 128), (240, 240, 240))
        src.paste((30, 60, 200), (32, 32, 96, 96))
        kw["image"] = [src]
    prompt = 'a red circle and the word "HI"'
    a, b = tp(prompt, seed=5, **kw), mp(prompt, seed=5, **kw)
    assert torch.equal(a.prior_token_ids, b.prior_token_ids)
    diff = np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16))
    assert diff.max() <= 1, diff.max()
    assert a.parameters == b.parameters


def test_torch_only_options_are_refused(shipped):
    from glimage.validate import InputError
    _, mp = shipped
    for call in (lambda: mp.enable_fast(step_cache=0.3), mp.enable_model_cpu_offload):
        with pytest.raises(InputError, match="PyTorch backend"):
            call()
    with pytest.raises(InputError, match="guidance_scale=-1"):  # the shared validation
        mp("x", guidance_scale=-1)


def test_compiled_same_tokens_and_images(shipped):
    """enable_compile: the AR decode as one static-shape step and the DiT in graph mode (ms.jit); a padded batch
    of two prompts draws the PyTorch path's tokens and images within 1/255."""
    tp, _ = shipped
    mp = MindSporePipeline.from_pretrained(DEFAULT_MODEL, device="cpu")
    mp.set_progress_bar_config(disable=True)
    mp.enable_compile()
    prompts = ["a blue square", 'a green triangle left of a sign that says "OK"']
    a, b = tp(prompts, seed=2, num_inference_steps=4), mp(prompts, seed=2, num_inference_steps=4)
    assert torch.equal(a.prior_token_ids, b.prior_token_ids)
    for x, y in zip(a.images, b.images):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


def test_device_and_dtype_mapping():
    from glimage.mindspore.pipeline import ms_dtype, set_device
    from glimage.validate import InputError
    assert set_device("cpu") == "CPU" and set_device(None) == "CPU"  # no Ascend or GPU here
    for bad, msg in (("tpu", "device='tpu' must be one of"), ("npu:x", "index after ':' must be a number")):
        with pytest.raises(InputError, match=msg):
            set_device(bad)
    assert ms_dtype(None, "CPU") == ms.float32 and ms_dtype(None, "Ascend") == ms.bfloat16
    assert ms_dtype("torch.float16", "GPU") == ms.float16
    with pytest.raises(InputError, match="bfloat16 has no MindSpore CPU kernels"):
        ms_dtype("bfloat16", "CPU")


def test_save_pretrained_round_trip(shipped, tmp_path):
    tp, mp = shipped
    mp.save_pretrained(tmp_path)
    back = GlmImagePipeline.from_pretrained(tmp_path)
    for a, b in ((back.dit, tp.dit), (back.ar, tp.ar), (back.vae, tp.vae), (back.glyph_encoder, tp.glyph_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.defaults == tp.defaults
