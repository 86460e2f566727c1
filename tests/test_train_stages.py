"""Training stages (vae, tokenizer, ar, decoder) and LoRA on the tiny preset, driven by a minimal local loop.

Each stage: loss falls over a few steps from scratch, one batch can be overfit, the export is a complete
folder that GlmImagePipeline loads and generates from. The AR stage's training logits equal the inference
decode loop's for the same tokens, positions and masks; the decoder feeds the DiT exactly the pipeline's
conditioning (sigma shift, timestep scale, unconditional branch); LoRA merged == unmerged and only adapters
train. Images are drawn here with PIL (coloured shapes on white), independent of glimage.data.
"""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import glimage.sampling
from glimage.image import preprocess_source
from glimage.models.ar import GlmImageAR
from glimage.pipeline import GlmImagePipeline
from glimage.prior import run_prior, tokenize_sources as infer_tokenize_sources
from glimage.train.config import TrainConfig, load_config
from glimage.train.lora import (AR_TARGETS, apply_lora, apply_lora_file, lora_modules, merge_lora, save_lora,
                                unmerge_lora)
from glimage.train.stages import make_stage
from glimage.train.stages.common import to_pil, vq_pixels

CPU, F32 = torch.device("cpu"), torch.float32
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 210, 20)}
SMALL_AR = {"ar.preview_side": 4}  # 4x4 preview instead of 16x16: short sequences, fast tests


def draw(i: int, size: int = 64, sources: int = 0) -> dict:
    rng = random.Random(i)
    color, shape = rng.choice(list(COLORS)), rng.choice(["circle", "square"])
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 8, size // 5)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    (d.ellipse if shape == "circle" else d.rectangle)((x - r, y - r, x + r, y + r), fill=COLORS[color])
    text = f"a {color} {shape}" if i % 3 else f'a sign that says "{"AB"[i % 2]}{i % 10}" next to a {color} {shape}'
    t = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1  # noqa: E731
    srcs = [t(im.transpose(Image.FLIP_LEFT_RIGHT).rotate(90 * k)) for k in range(sources)]
    return {"index": i, "image": t(im), "text": text, "sources": srcs}


DATA = [draw(i) for i in range(16)]


def stage_for(name: str, tmp_path, data=DATA, **kw):
    cfg = TrainConfig(stage=name, out=str(tmp_path / name), seed=0, **kw)
    st = make_stage(cfg, data)
    st.setup(CPU, F32)
    return st


def evaluate(st, model, samples) -> float:
    """Loss of one batch with a fixed generator (same noise, timesteps, dropout every time)."""
    with torch.no_grad():
        out = st.step(model, st.collate(samples), torch.Generator().manual_seed(1234))
    return (out.loss_sum / out.count).item()


def train(st, batches, steps: int, lr: float, model=None, seed=None) -> tuple[torch.nn.Module, list[float]]:
    """The minimal loop: AdamW on loss_sum / count; generator seeded by the step (or always by `seed`)."""
    model = st.build() if model is None else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    losses = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i if seed is None else seed)
        out = st.step(model, st.collate(batches[i % len(batches)]), gen)
        loss = out.loss_sum / out.count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def check_falls_and_overfits(name, tmp_path, data, fresh_steps, fit_steps, lr, factor, **kw):
    """From scratch: a few steps on changing batches lower the loss of a held-out batch (measured with fixed
    noise); then one batch, with the same noise every step, is overfit: its loss drops by `factor`."""
    st = stage_for(name, tmp_path, data, **kw)
    held, train_set = data[:4], data[4:]
    model = st.build()
    start = evaluate(st, model, held)
    model, _ = train(st, [train_set[i:i + 4] for i in range(0, len(train_set), 4)], fresh_steps, lr, model)
    assert evaluate(st, model, held) < 0.9 * start
    model = st.build()
    start = evaluate(st, model, held)
    model, _ = train(st, [held], fit_steps, lr, model, seed=1234)
    end = evaluate(st, model, held)
    assert end < start / factor, (start, end)
    return st, model


def generate(folder, **kw):
    pipe = GlmImagePipeline.from_pretrained(folder, device="cpu", dtype=F32)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", height=64, width=64, num_inference_steps=2, seed=0, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    return pipe


# ------------------------------------------------------------------------------------------------ stages

def test_vae_trains_and_exports_latent_statistics(tmp_path):
    data = [draw(i, size=32) for i in range(12)]
    st, model = check_falls_and_overfits("vae", tmp_path, data, 8, 25, 3e-3, 3)
    st.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    vae = pipe.vae
    assert vae.cfg.latents_mean is not None
    x = torch.stack([d["image"] for d in data])
    z = vae.normalize_latents(vae.encode(x).mean).transpose(0, 1).flatten(1)  # (C, N)
    torch.testing.assert_close(z.mean(1), torch.zeros(z.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(z.shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.encoder.conv_in.weight, model.encoder.conv_in.weight)
    assert list(st.samples(model, tmp_path / "samples", 3))


def test_tokenizer_trains_and_exports_into_the_ar_checkpoint(tmp_path):
    st, model = check_falls_and_overfits("tokenizer", tmp_path, DATA, 8, 30, 3e-3, 2, model=SMALL_AR)
    st.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    torch.testing.assert_close(pipe.ar.vqmodel.quantize.embedding.weight, model.vqmodel.quantize.embedding.weight)
    torch.testing.assert_close(pipe.ar.visual.blocks[0].attn.qkv.weight, model.visual.blocks[0].attn.qkv.weight)
    # the exported tokenizer gives the ids the training forward computed, through the inference path
    x = DATA[0]["image"]
    ids = infer_tokenize_sources(pipe.ar, [[to_pil(x)]])[0][0]
    assert torch.equal(ids, model.quantize(vq_pixels(x[None], 2, 2, 16))[0][0])


def test_ar_trains_t2i_and_i2i(tmp_path):
    check_falls_and_overfits("ar", tmp_path, DATA, 8, 25, 3e-3, 3, model=SMALL_AR)
    st = stage_for("ar", tmp_path, [draw(i, sources=1 + i % 2) for i in range(4)], model=SMALL_AR)
    model, losses = train(st, [st.dataset()], 3, 3e-3)  # a batch mixing 1- and 2-source samples
    assert losses[-1] < losses[0]


def test_ar_targets_are_inference_grids(tmp_path):
    st = stage_for("ar", tmp_path, model=SMALL_AR)
    b = st.make_batch(st.collate(DATA[:2]))[0]
    x = DATA[1]["image"]
    # the large grid is what the inference tokenizer gives for this image (smart_resize keeps 64 px)
    src = preprocess_source(to_pil(x), 16, st.ar_cfg.source_min_pixels, st.ar_cfg.source_max_pixels)
    torch.testing.assert_close(vq_pixels(x[None], 2, 2, 16)[0], src, rtol=0, atol=0)
    large = st.enc(src[None])[0].flatten()
    preview = st.enc(vq_pixels(x[None], 4, 4, 16))[0].flatten()
    assert torch.equal(b.targets[1], torch.cat([preview, large]))  # no eoi: tiny's head is 16384 wide
    assert b.input_ids[1, b.start].item() == st.ar_cfg.image_start_token_id
    assert torch.equal(b.input_ids[1, b.start + 1:], b.targets[1, :-1])


@pytest.mark.parametrize("n_src", [0, 1])
def test_ar_training_logits_equal_the_decode_loop(tmp_path, monkeypatch, n_src):
    """Teacher forcing = inference: the training forward's logits at every target position equal the logits
    the decode loop (prefill + KV-cached steps) computes when fed the same tokens, for a left-padded batch."""
    data = [draw(i, sources=n_src) for i in range(2)]
    data[1]["text"] = "a blue square in the middle of a much longer caption"  # forces left padding
    st = stage_for("ar", tmp_path, data, model=SMALL_AR)
    model = st.build()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # bias-free random init would hide position errors: perturb everything
            p.add_(torch.randn_like(p) * 0.02)
    b = st.make_batch(st.collate(data))[0]
    assert b.mask is not None
    logits = model(b.input_ids, b.position_ids, b.mask, b.start)

    ar = GlmImageAR(st.ar_cfg).eval()
    ar.load_state_dict({**model.state_dict(), **{k: v for k, v in st.enc.state_dict().items()}}, strict=True)
    seen = []

    def forced(step_logits, *args, **kw):
        seen.append(step_logits.clone())
        return b.targets[:, len(seen) - 1]

    monkeypatch.setattr(glimage.sampling, "sample", forced)
    images = [[to_pil(s) for s in d["sources"]] for d in data] if n_src else None
    prior = run_prior(ar, st.tok, [d["text"] for d in data], 64, 64, images, torch.Generator(), progress=False)
    decode = torch.stack(seen, 1)  # (B, n_grid, V)
    assert torch.equal(prior.tokens, b.targets[:, :decode.shape[1]])
    assert decode.shape[1] == logits.shape[1] == (16 + 4 if n_src == 0 else 4)
    torch.testing.assert_close(logits, decode, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ar", "decoder"])
def test_cached_encodings_equal_uncached(tmp_path, name, monkeypatch):
    """cache = true: the frozen encoders run once per sample; later batches (in any order, mixing cached and
    new samples) get exactly what the encoders give."""
    data = DATA[:6] + [draw(6 + i, sources=1 + i % 2) for i in range(2)]
    kw = {"model": SMALL_AR} if name == "ar" else {}
    plain, cached = stage_for(name, tmp_path, data, **kw), stage_for(name, tmp_path, data, cache=True, **kw)
    fwd = cached.enc.forward
    calls = []
    monkeypatch.setattr(cached.enc, "forward", lambda x: calls.append(len(x)) or fwd(x))

    def batches(st, rows):
        b = st.collate([data[i] for i in rows])
        if name == "ar":
            return [(a.input_ids, a.targets) for a in st.make_batch(b)]
        return st._encode(b["images"], b["index"])

    for rows in ([0, 1, 2], [2, 1, 0], [3, 0, 4, 5], [5, 3], [6, 7, 0]):
        n = len(calls)
        for a, c in zip(batches(plain, rows), batches(cached, rows)):
            for x, y in zip(a, c) if isinstance(a, tuple) else [(a, c)]:
                assert torch.equal(x, y)
        if rows in ([2, 1, 0], [5, 3]):
            assert len(calls) == n  # every sample already cached: no encoder call


def test_decoder_trains_t2i_and_i2i(tmp_path):
    st, model = check_falls_and_overfits("decoder", tmp_path, DATA, 30, 40, 3e-3, 10, cond_drop=0.2)
    st2 = stage_for("decoder", tmp_path, [draw(i, sources=1 + i % 2) for i in range(4)], cond_drop=0.3)
    _, losses = train(st2, [st2.dataset()], 3, 3e-3)
    assert all(np.isfinite(losses))
    st.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    torch.testing.assert_close(pipe.dit.proj_out.weight, model.proj_out.weight)
    pipe(prompt="a red circle", image=[to_pil(DATA[0]["image"])], height=64, width=64, num_inference_steps=2, seed=0)


def test_decoder_trains_its_glyph_encoder(tmp_path):
    """train_glyph: at init the step is the frozen-glyph step exactly (same embeddings, masks, loss); training
    moves the glyph encoder (its gradient comes through the DiT) and the export's text_encoder/ is the trained
    one, loaded strictly by the pipeline. Quoted texts of unequal lengths in one batch exercise the masks."""
    frozen, trained = stage_for("decoder", tmp_path / "a"), stage_for("decoder", tmp_path / "b", train_glyph=True)
    assert {k.split(".")[0] for k, p in trained.build().named_parameters() if p.requires_grad} >= {"glyph_encoder"}
    batch = DATA[:8]
    a, b = evaluate(frozen, frozen.build(), batch), evaluate(trained, trained.build(), batch)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    model = trained.build()
    start = {k: v.clone() for k, v in model.glyph_encoder.state_dict().items()}
    model, losses = train(trained, [batch], 5, 3e-3, model)
    assert all(np.isfinite(losses))
    moved = [k for k, v in model.glyph_encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert "shared.weight" in moved and len(moved) == len(start)
    trained.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    for k, v in model.glyph_encoder.state_dict().items():
        torch.testing.assert_close(pipe.glyph_encoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="train_glyph"):
        TrainConfig(stage="vae", out=str(tmp_path), train_glyph=True)


def test_decoder_trains_a_glyph_encoder_of_another_shape_than_the_bases(tmp_path):
    """With train_glyph, model.glyph.* may reshape the glyph encoder (random start, seeded); the export writes
    its config and weights and loads strictly. Without train_glyph it stays a frozen component; its width
    must match the DiT's."""
    GlmImagePipeline.from_config("tiny").save_pretrained(tmp_path / "base")
    base = str(tmp_path / "base")
    st = stage_for("decoder", tmp_path, base=base, train_glyph=True, model={"glyph.num_layers": 3})
    model = st.build()
    assert len(model.glyph_encoder.encoder.block) == 3
    again = stage_for("decoder", tmp_path / "b", base=base, train_glyph=True, model={"glyph.num_layers": 3})
    for k, v in again.build().glyph_encoder.state_dict().items():
        assert torch.equal(v, model.glyph_encoder.state_dict()[k])
    model, losses = train(st, [DATA[:4]], 2, 1e-3, model)
    assert all(np.isfinite(losses))
    st.export(model, tmp_path / "export")
    pipe = generate(tmp_path / "export")
    assert pipe.glyph_encoder.cfg.num_layers == 3
    for k, v in model.glyph_encoder.state_dict().items():
        torch.testing.assert_close(pipe.glyph_encoder.state_dict()[k], v)
    with pytest.raises(ValueError, match="frozen component"):
        stage_for("decoder", tmp_path, base=base, model={"glyph.num_layers": 3})
    with pytest.raises(ValueError, match="glyph.d_model"):
        stage_for("decoder", tmp_path, base=base, train_glyph=True, model={"glyph.d_model": 48})


def test_decoder_feeds_the_pipelines_conditioning(tmp_path):
    """x_t = (1 - sigma) x0 + sigma eps with the inference shift, timestep t - 1, and condition dropout =
    the pipeline's unconditional branch: all prior tokens dropped and the empty-string glyph."""
    from glimage.flow import compute_mu, shift_sigmas
    from glimage.glyph_text import encode_glyphs
    st = stage_for("decoder", tmp_path, cond_drop=0.5)
    model = st.build()
    calls = []
    forward = model.forward
    model.forward = lambda *a, **kw: calls.append((a, kw)) or forward(*a, **kw)
    batch = st.collate(DATA[:8])
    gen = torch.Generator().manual_seed(3)
    out = st.step(model, batch, gen)
    assert out.count == 8 * 4 * 4  # 64 px -> 8x8 latents -> 4x4 DiT tokens per image
    (x_t, glyph, prior, drop, t, size, crop), kw = calls[0][0], calls[0][1]
    # replay the per-sample generators (seeded from the step generator outside the loop): posterior noise,
    # timestep, flow noise, dropout, in that order per sample
    batch = dict(batch, sample_seeds=torch.randint(0, 2**62, (8,), generator=torch.Generator().manual_seed(3)).tolist())
    gens = [torch.Generator().manual_seed(s) for s in batch["sample_seeds"]]
    mean, logvar, ids = st._encode(batch["images"], batch["index"])
    x0 = st.vae.normalize_latents(mean + torch.exp(0.5 * logvar) * torch.stack([torch.randn(mean.shape[1:], generator=g)
                                                                                 for g in gens]))
    tt = torch.stack([torch.randint(1, 1001, (), generator=g) for g in gens])
    sigma = shift_sigmas(tt.float() / 1000, compute_mu(16, st.model_cfg.scheduler)).view(8, 1, 1, 1)
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    dropped = torch.stack([torch.rand((), generator=g) for g in gens]) < 0.5
    assert 0 < int(dropped.sum()) < 8
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(t, (tt - 1).float())
    assert torch.equal(prior, ids) and torch.equal(drop, dropped[:, None].expand_as(ids))
    assert torch.equal(size, torch.tensor([[64.0, 64.0]]).repeat(8, 1)) and not crop.any()
    empty = encode_glyphs(st.glyph, [""], CPU, F32)[0, -1]
    mask = kw["glyph_mask"]
    for b in range(8):
        real = glyph[b][mask[b]] if mask is not None else glyph[b]
        want = encode_glyphs(st.glyph, ["" if dropped[b] else batch["texts"][b]], CPU, F32)[0]
        torch.testing.assert_close(real, want)
        if dropped[b]:
            torch.testing.assert_close(real[-1], empty)


def test_export_loads_in_the_reference(tmp_path, ref_pipe):
    """A chained export (vae -> tokenizer -> ar -> decoder, a few steps each, official tiny structure) loads
    in diffusers' GlmImagePipeline and draws the same image as ours from it."""
    from diffusers import GlmImagePipeline as RefPipeline
    from reference import patch_i2i_version_skew
    base = ""
    for name, kw in (("vae", {}), ("tokenizer", {}), ("ar", {}), ("decoder", {})):
        data = [draw(i, size=32 if name == "vae" else 64) for i in range(4)]
        st = stage_for(name, tmp_path, data, base=base, **kw)
        model, _ = train(st, [data], 2, 1e-3)
        base = str(tmp_path / f"{name}-export")
        st.export(model, base)
    ours = GlmImagePipeline.from_pretrained(base, device="cpu", dtype=F32)
    ours.set_progress_bar_config(disable=True)
    ref = RefPipeline.from_pretrained(base)
    ref.set_progress_bar_config(disable=True)
    patch_i2i_version_skew(ref.vision_language_encoder)
    kw = dict(prompt='a sign that says "HI"', height=64, width=64, num_inference_steps=2, guidance_scale=1.5,
              output_type="np")
    got = ours(generator=torch.Generator().manual_seed(0), **kw).images
    want = ref(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(got - want).max() <= 1 / 255


# -------------------------------------------------------------------------------------------------- LoRA

def test_lora_merge_equals_unmerged_and_only_adapters_train(tmp_path):
    st = stage_for("ar", tmp_path, model=SMALL_AR, lora_rank=4, lora_alpha=8.0)
    model = st.build()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert len(lora_modules(model)) == 6 * st.ar_cfg.text.num_hidden_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(3):
        out = st.step(model, st.collate(DATA[:4]), torch.Generator().manual_seed(i))
        opt.zero_grad()
        (out.loss_sum / out.count).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".lora_B") or k.endswith(".lora_A") for k in changed)
    assert any(k.endswith(".lora_B") for k in changed)

    # merged export: official layout, base + B A * scale; separate export: base unchanged + adapter file
    st.export(model, tmp_path / "merged")
    merged = GlmImagePipeline.from_pretrained(tmp_path / "merged", device="cpu", dtype=F32)
    st.cfg = TrainConfig(**{**st.cfg.__dict__, "lora_merge": False})
    st.export(model, tmp_path / "apart")
    apart = GlmImagePipeline.from_pretrained(tmp_path / "apart", device="cpu", dtype=F32)  # merges the adapter
    q = "language_model.layers.0.self_attn.q_proj"
    base_w = before[f"{q}.weight"]
    from glimage.checkpoint import read_state_dict
    raw = read_state_dict(tmp_path / "apart" / "vision_language_encoder")  # the weights file keeps the base
    torch.testing.assert_close(raw[f"model.{q}.weight"], base_w, rtol=0, atol=0)
    conf = json.loads((tmp_path / "apart" / "vision_language_encoder" / "lora.json").read_text())
    assert conf["rank"] == 4 and q in conf["modules"]
    for k, v in merged.ar.state_dict().items():
        torch.testing.assert_close(apart.ar.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged.ar.state_dict()[f"{q}.weight"], base_w)

    b = st.make_batch(st.collate(DATA[:2]))[0]
    with torch.no_grad():
        y = model(b.input_ids, b.position_ids, b.mask, b.start)
        merge_lora(model)
        y_merged = model(b.input_ids, b.position_ids, b.mask, b.start)
        unmerge_lora(model)
        y_again = model(b.input_ids, b.position_ids, b.mask, b.start)
    torch.testing.assert_close(y_merged, y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y_again, y, rtol=1e-5, atol=1e-5)
    for k, v in before.items():  # unmerge restores the base weights
        torch.testing.assert_close(model.state_dict()[k], after[k] if ".lora_" in k else v, rtol=0, atol=1e-6)


def test_lora_file_round_trip_and_dit_targets(tmp_path):
    from glimage.config import PRESETS
    from glimage.models.dit import GlmImageDiT
    from glimage.train.lora import DIT_TARGETS
    torch.manual_seed(0)
    dit = GlmImageDiT(PRESETS["tiny"].dit)
    names = apply_lora(dit, 2, 4.0, DIT_TARGETS)
    assert len(names) == 6 * len(dit.transformer_blocks)
    for m in lora_modules(dit).values():
        torch.nn.init.normal_(m.lora_B)
    save_lora(dit, tmp_path, DIT_TARGETS)
    fresh = GlmImageDiT(PRESETS["tiny"].dit)
    plain = {k: v for k, v in dit.state_dict().items() if ".lora_" not in k}
    fresh.load_state_dict(plain)
    wrapped = GlmImageDiT(PRESETS["tiny"].dit)
    wrapped.load_state_dict(plain)
    apply_lora_file(fresh, tmp_path / "lora.safetensors", merge=True)
    apply_lora_file(wrapped, tmp_path, merge=False)
    merge_lora(dit)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, dit.state_dict()[k])
    assert len(lora_modules(wrapped)) == len(names)
    with pytest.raises(ValueError, match="does not exist"):
        apply_lora_file(GlmImageAR(PRESETS["tiny"].ar), tmp_path)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), 2, 4.0, AR_TARGETS)


# ------------------------------------------------------------------------------------------------ recipes

def test_recipes_parse_and_chain(tmp_path):
    chain = ["tiny-vae", "tiny-tokenizer", "tiny-ar", "tiny-decoder"]
    cfgs = {n: load_config(n) for n in chain + ["tiny-ar-lora", "tiny-decoder-lora"]}
    assert [cfgs[n].stage for n in chain] == ["vae", "tokenizer", "ar", "decoder"]
    assert cfgs["tiny-vae"].base == ""
    for prev, nxt in zip(chain, chain[1:]):
        assert cfgs[nxt].base == f"{cfgs[prev].out}/export"
    assert cfgs["tiny-ar-lora"].lora_rank > 0 and not cfgs["tiny-ar-lora"].lora_merge
    assert cfgs["tiny-decoder-lora"].lora_rank > 0 and cfgs["tiny-decoder-lora"].lora_merge
    with pytest.raises(ValueError, match="not a GLM-Image folder"):  # e.g. the previous recipe did not run
        make_stage(dataclasses.replace(cfgs["tiny-ar"], base=str(tmp_path / "missing")))
    GlmImagePipeline.from_config("tiny").save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="frozen component"):
        make_stage(TrainConfig(stage="ar", base=str(tmp_path / "base"), model={"vae.latent_channels": 8}))


def test_recipes_run_through_the_training_loop(tmp_path):
    """The shipped chain through glimage.train.loop.train (few steps, a small generated shapes set)."""
    loop = pytest.importorskip("glimage.train.loop")
    small = ["steps=2", "data_n=8", "batch_size=2", "checkpoint_every=0", "tensorboard=false", "warmup=1"]
    base = ""
    for name, extra in (("tiny-vae", ["image_size=32"]), ("tiny-tokenizer", ["image_size=64"]),
                        ("tiny-ar", ["image_size=64", "model.ar.preview_side=4"]),
                        ("tiny-decoder", ["image_size=64"])):
        cfg = load_config(name, small + extra + [f"out={tmp_path / name}", f"base={base}"])
        base = loop.train(cfg)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
        # the export's defaults are what its recipe trained and sampled at, not the official 1024x1024, 50 steps
        assert json.loads((tmp_path / name / "export" / "glimage.json").read_text()) == {
            "height": cfg.image_size, "width": cfg.image_size, "num_inference_steps": cfg.sample_steps,
            "guidance_scale": cfg.sample_guidance}
    assert (cfg.image_size, cfg.sample_steps, cfg.sample_guidance) == (64, load_config("tiny-decoder").sample_steps,
                                                                       load_config("tiny-decoder").sample_guidance)
    pipe = generate(base)
    out = pipe("a red circle", seed=0, output_type="np")  # every generation parameter left to the folder
    assert out.images.shape == (1, 64, 64, 3)
    assert {k: out.parameters[k] for k in ("height", "width", "num_inference_steps", "guidance_scale")} == {
        "height": 64, "width": 64, "num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.sample_guidance}


def test_vae_color_augment_greys_some_samples_deterministically():
    from glimage.train.config import TrainConfig
    from glimage.train.stages.vae import color_augment
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(16)]  # noqa: E731
    a, b = color_augment(x, gens()), color_augment(x, gens())
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    same = [torch.equal(a[i], x[i]) for i in range(16)]
    grey = [torch.equal(a[i, 0], a[i, 1]) and torch.equal(a[i, 1], a[i, 2]) for i in range(16)]
    assert all(s or g for s, g in zip(same, grey)) and 0 < sum(grey) < 16
    with pytest.raises(ValueError, match="color_aug"):
        TrainConfig(stage="ar", color_aug=True)
    with pytest.raises(ValueError, match="needs a base"):
        TrainConfig(stage="vae", freeze_encoder=True)
