"""AR invariants: cached == uncached decoding, the official layout, conversion round trips, bad input."""

import pytest
import torch

from glimage.checkpoint import CheckpointError, build_on_meta, read_state_dict, save_state_dict
from glimage.config import PRESETS, replace
from glimage.convert.ar import config_to_official, from_official, load_ar, save_ar, to_official
from glimage.image import preprocess_source
from glimage.models.ar import GlmImageAR
from glimage.pipeline import GlmImagePipeline
from glimage.sampling import generate_grid_tokens, prefill_mask, sample, warp
from glimage.validate import check_target_size


def _tiny_ar(seed=0, **changes):
    torch.manual_seed(seed)
    cfg = replace(PRESETS["tiny"].ar, **changes)
    model = GlmImageAR(cfg).eval()
    for p in model.parameters():  # random init with some scale so logits are not flat
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_cached_decoding_equals_uncached():
    model = _tiny_ar()
    B, L, n = 2, 7, 9
    ids = torch.randint(0, 16384, (B, L + n))
    pos = torch.randint(0, 40, (3, B, L + n))
    with torch.no_grad():
        full = model(ids, pos)  # (B, L+n, V), one causal pass
        cache = model.new_cache(B, L + n)
        steps = [model(ids[:, :L], pos[:, :, :L], None, cache, 0)]
        for t in range(L, L + n):
            steps.append(model(ids[:, t:t + 1], pos[:, :, t:t + 1], None, cache, t))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # chunked: prefill, then several tokens at once after the cached prefix
        cache = model.new_cache(B, L + n)
        a = model(ids[:, :L], pos[:, :, :L], None, cache, 0)
        b = model(ids[:, L:], pos[:, :, L:], None, cache, L)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_real_rows():
    model = _tiny_ar()
    ids = torch.randint(0, 16384, (1, 6))
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    pad_ids = torch.cat([torch.full((1, 3), 167841), ids], 1)
    pad_pos = torch.cat([torch.ones(3, 1, 3, dtype=torch.long), pos], 2)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(ids, pos)
        b = model(pad_ids, pad_pos, prefill_mask(mask, 9))[:, 3:]
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grid_always_complete_with_full_visual_head(tmp_path):
    # the official head spans 16512 ids; 16384.. are image start/end and unused slots. Bias the head so the
    # specials dominate: the reference would sample them and break its grid; we mask them.
    model = _tiny_ar(**{"text.vision_vocab_size": 16512})
    with torch.no_grad():
        model.lm_head.weight[16384:] *= 50
    from glimage.prompt import GlmTokenizer, build_prompts
    tok = GlmTokenizer.byte_level()
    batch = build_prompts(["x"], 64, 64, tok, model.cfg)
    out = generate_grid_tokens(model, batch, 0.9, 50, 0.75, torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (1, 256 + 4) and int(out.max()) < 16384


def test_warpers_match_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    s = warp(logits, 1.0, 5, 1.0)
    assert ((s > float("-inf")).sum(-1) == 5).all()
    s = warp(logits, 1.0, 0, 0.5)
    kept = torch.softmax(logits, -1).masked_fill(s == float("-inf"), 0).sum(-1)
    assert (kept >= 0.5).all()
    ids = sample(logits, 0.9, 50, 0.75, n_valid=10, generator=torch.Generator().manual_seed(0))
    assert (ids < 10).all()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample(logits, 0.9, 50, 0.75, generator=g1), sample(logits, 0.9, 50, 0.75, generator=g2))


def test_official_preset_matches_reference_layout():
    pytest.importorskip("transformers")
    from transformers import GlmImageConfig as RefConfig
    from transformers import GlmImageForConditionalGeneration
    cfg = PRESETS["glm-image"].ar
    with torch.device("meta"):
        ref = GlmImageForConditionalGeneration(RefConfig(**{k: v for k, v in config_to_official(cfg).items()
                                                            if k not in ("architectures", "model_type")}))
    ours = build_on_meta(lambda: GlmImageAR(cfg))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in to_official(ours.state_dict()).items()}
    assert our_shapes == ref_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 10_114_245_632


def test_key_map_round_trip():
    model = _tiny_ar()
    sd = model.state_dict()
    official = to_official(sd)
    assert all(k.startswith(("model.visual.", "model.language_model.", "model.vqmodel.", "lm_head.")) for k in official)
    back = from_official(official)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_save_loads_in_reference_with_equal_logits(tmp_path):
    pytest.importorskip("transformers")
    from transformers import GlmImageForConditionalGeneration
    model = _tiny_ar()
    save_ar(model, tmp_path)
    ref = GlmImageForConditionalGeneration.from_pretrained(tmp_path / "vision_language_encoder").eval()
    again = load_ar(tmp_path)
    ids = torch.randint(0, 16384, (1, 12))
    pos = torch.arange(12).view(1, 1, 12).expand(3, 1, 12)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, position_ids=pos).logits
        torch.testing.assert_close(model(ids, pos), ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(again(ids, pos), model(ids, pos))
    assert again.cfg == model.cfg


@pytest.mark.parametrize("h,w,msg", [(100, 64, "height=100 is not a size this model draws"), (0, 64, "height=0"),
                                     (64, 16, "width=16"), (64, 64 * 300, "too elongated"), (64.0, 64, "height=64.0")])
def test_bad_sizes(h, w, msg):
    """Only what cannot work is refused for a model without a stated range (the reference draws the rest)."""
    cfg = PRESETS["tiny"].ar
    with pytest.raises(ValueError, match=msg):
        check_target_size(h, w, cfg)
    check_target_size(32, 32, cfg)
    check_target_size(64, 2048, cfg)  # beyond the ViT's table and aspect 4: the target grid needs neither


def test_official_model_keeps_zhipus_range(tmp_path):
    from glimage.convert.ar import config_from_official, config_to_official
    official = PRESETS["glm-image"].ar
    check_target_size(1024, 1024, official)
    with pytest.raises(ValueError, match=r"width=4096 .* multiple of 32 in \[512, 2048\]"):
        check_target_size(1024, 4096, official)
    with pytest.raises(ValueError, match=r"height=256"):
        check_target_size(256, 1024, official)
    # the published folder carries no size range: its architecture gets Zhipu's; a tiny one gets none
    assert config_from_official(config_to_official(official)).size_range == (512, 2048)
    tiny = config_from_official(config_to_official(PRESETS["tiny"].ar))  # no stated range: derived from the context
    assert tiny.max_size is None and tiny.size_range == (32, tiny.largest_side(32))


def test_bad_source_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image file"):
        preprocess_source(bad, 16, 32 * 32, 128 * 128)
    with pytest.raises(ValueError, match="no such file"):
        preprocess_source(tmp_path / "missing.png", 16, 32 * 32, 128 * 128)
    from PIL import Image
    with pytest.raises(ValueError, match="too small"):
        preprocess_source(Image.new("RGB", (8, 64)), 16, 32 * 32, 128 * 128)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_source(Image.new("RGB", (640, 64)), 16, 32 * 32, 128 * 128)


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_checkpoint_errors_name_the_tensor(tmp_path, damage):
    model = _tiny_ar()
    save_ar(model, tmp_path)
    folder = tmp_path / "vision_language_encoder"
    sd = read_state_dict(folder)
    if damage == "missing":
        del sd["model.language_model.norm.weight"]
    elif damage == "extra":
        sd["model.language_model.bogus"] = torch.zeros(1)
    else:
        sd["lm_head.weight"] = sd["lm_head.weight"][:100]
    save_state_dict(sd, folder)
    name = {"missing": "language_model.norm.weight", "extra": "language_model.bogus", "shape": "lm_head.weight"}
    with pytest.raises(CheckpointError, match=name[damage]):
        load_ar(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    model = _tiny_ar()
    save_ar(model, tmp_path)
    folder = tmp_path / "vision_language_encoder"
    sd = read_state_dict(folder)
    (folder / "model.safetensors").unlink()
    save_state_dict(sd, folder, max_shard_bytes=4 * 2**20)
    assert (folder / "model.safetensors.index.json").is_file()
    again = load_ar(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_pipeline_rejects_non_folder(tmp_path):
    with pytest.raises(ValueError, match="not a GLM-Image folder"):
        GlmImagePipeline.from_pretrained(tmp_path)


def test_static_shape_decode_draws_the_eager_tokens():
    """The static-shape step (the whole cache, a mask, the position as a device tensor: what torch.compile and
    CUDA graphs need) draws exactly the eager loop's tokens, left padding included."""
    from glimage.prompt import GlmTokenizer, build_prompts
    from glimage.sampling import static_step
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = GlmImageAR(cfg.ar).eval()
    batch = build_prompts(["a red circle", 'a much longer prompt with a sign that says "HI"'], 64, 96,
                          GlmTokenizer.byte_level(cfg.ar), cfg.ar)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    eager = generate_grid_tokens(model, batch, 0.9, 50, 0.75, gens(), progress=False)
    static = generate_grid_tokens(model, batch, 0.9, 50, 0.75, gens(), progress=False, step=static_step)
    assert torch.equal(eager, static)
