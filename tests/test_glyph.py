"""Glyph path: ByT5 tokenizer + quoted-span extraction + T5 encoder vs transformers' T5EncoderModel / ByT5Tokenizer
and the reference pipeline's get_glyph_texts / encode_prompt."""

import dataclasses
import warnings

import pytest
import torch

from glimage.checkpoint import read_state_dict
from glimage.config import PRESETS
from glimage.convert.glyph import (config_from_official, config_to_official, from_official, load_glyph_encoder,
                                   save_glyph_encoder, to_official)
from glimage.glyph_text import encode_glyphs, glyph_texts, glyph_token_ids, tokenize
from glimage.models.glyph import GlyphEncoder

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a quiet street at dusk",  # no span
    "a neon sign that says 'OPEN'",  # one span
    'a poster with "Hello" and "World"',  # two spans -> the pad-parity quirk
    "menu: “Café au lait” 'Tea' 「東京」",  # three spans, three kinds, reference order differs from text order
    "'a' “b” \"c\" 「d」 'é漢😀'",  # every kind, non-ASCII, even count
    "it's Bob's cat, and ''",  # apostrophes become a span; an empty span
    "unclosed “quote and 「bracket",
]

TEXTS = ["", "ab", "a </s> b", "a</s>", "x <extra_id_0> y", "<pad>", "é中", "a  b ", " <unk>z", "A\u0301",
         "</s> </s>", "q\t<pad>\n r", "<extra_id_124><extra_id_125>", "emoji 😀", "x</s>y"]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def glyph(ref_dir):
    return load_glyph_encoder(ref_dir / "text_encoder")


def test_config_read_from_folder(glyph, tiny_cfg):
    assert glyph.cfg == tiny_cfg.glyph
    assert config_from_official(config_to_official(tiny_cfg.glyph)) == tiny_cfg.glyph


@pytest.mark.parametrize("max_length", [2048, 1, 2, 3, 5])
def test_tokenizer_matches_byt5(ref_pipe, max_length):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ByT5Tokenizer warns when a text already ends in </s>
        ref = ref_pipe.tokenizer(TEXTS, max_length=max_length, truncation=True).input_ids
    assert [tokenize(t, max_length) for t in TEXTS] == ref


def test_glyph_texts_match_pipeline(ref_pipe):
    assert [glyph_texts(p) for p in PROMPTS] == ref_pipe.get_glyph_texts(PROMPTS)
    assert glyph_texts(PROMPTS[3]) == ["Tea", "Café au lait", "東京"]  # kind order, not text order
    # the pad-parity quirk: one valid pad (id 0) before every span iff the prompt has an even number of spans
    assert glyph_token_ids(PROMPTS[2], 2048) == [[0] + tokenize("Hello", 2048), [0] + tokenize("World", 2048)]
    assert glyph_token_ids(PROMPTS[1], 2048) == [tokenize("OPEN", 2048)]
    assert glyph_token_ids(PROMPTS[0], 2048) == [[1]]  # no span -> "" -> eos only


@torch.no_grad()
def test_t5_parity_with_masks(glyph, ref_pipe):
    g = torch.Generator().manual_seed(0)
    L = 300  # > relative_attention_max_distance: exercises the log-spaced and the clamped buckets
    ids = torch.randint(0, 384, (3, L), generator=g)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, 200:] = 0
    mask[2, 5:] = 0
    close(glyph(ids, mask), ref_pipe.text_encoder(ids, attention_mask=mask).last_hidden_state)
    close(glyph(ids), ref_pipe.text_encoder(ids).last_hidden_state)
    short = ids[:2, :7]
    close(glyph(short, torch.ones_like(short)), ref_pipe.text_encoder(short).last_hidden_state)


@pytest.mark.parametrize("batch", [PROMPTS[2:3], PROMPTS[:2], PROMPTS[3:5], PROMPTS])
@torch.no_grad()
def test_encode_glyphs_matches_encode_prompt(glyph, ref_pipe, batch):
    ref_pos, ref_neg = ref_pipe.encode_prompt(batch, do_classifier_free_guidance=True, device=torch.device("cpu"),
                                              dtype=torch.float32)
    pos = encode_glyphs(glyph, batch, "cpu", torch.float32)
    neg = encode_glyphs(glyph, [""] * len(batch), "cpu", torch.float32)
    assert pos.shape == ref_pos.shape and neg.shape == ref_neg.shape == (len(batch), 1, glyph.cfg.d_model)
    close(pos, ref_pos, tol=0)  # one T5 call per prompt like the reference: bit-identical on CPU
    close(neg, ref_neg, tol=0)
    assert encode_glyphs(glyph, batch, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_official_layout_on_meta():
    cfg = PRESETS["glm-image"].glyph
    with torch.device("meta"):
        ours = GlyphEncoder(cfg)
        ref = transformers.T5EncoderModel(transformers.T5Config(**config_to_official(cfg)))
    ref_sd = ref.state_dict()
    assert "encoder.embed_tokens.weight" in ref_sd and len(ref_sd) == 112  # the tied copy
    ours_sd = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in
                                                                from_official(ref_sd).items()}
    assert set(to_official(ours_sd)) == set(ref_sd) - {"encoder.embed_tokens.weight"}
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 217_657_472


def test_round_trip(glyph, ref_dir, tmp_path):
    sd = read_state_dict(ref_dir / "text_encoder")
    assert "encoder.embed_tokens.weight" not in sd  # transformers 5 writes the tied embedding once
    back = to_official(from_official(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # older files carry both tied names: the pair collapses onto `shared`
    both = {**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}
    assert from_official(both).keys() == from_official(sd).keys()
    save_glyph_encoder(glyph, tmp_path)
    ref = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    with torch.no_grad():
        close(glyph(ids, mask), ref(ids, attention_mask=mask).last_hidden_state, tol=0)
    assert load_glyph_encoder(tmp_path).cfg == glyph.cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parity(ref_dir, dtype):
    """Loaded in fp16, transformers keeps `wo` in fp32 (`_keep_in_fp32_modules`), in bf16 it does not."""
    model = load_glyph_encoder(ref_dir / "text_encoder", dtype=dtype)
    ref = transformers.T5EncoderModel.from_pretrained(ref_dir / "text_encoder", dtype=dtype).eval()
    dense, ref_dense = model.encoder.block[0].layer[1].DenseReluDense, ref.encoder.block[0].layer[1].DenseReluDense
    assert dense.wo.weight.dtype == ref_dense.wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert dense.wi_0.weight.dtype == dtype
    ids = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        out = model(ids, mask)
        assert out.dtype == dtype
        close(out, ref(ids, attention_mask=mask).last_hidden_state, tol=0)


def test_bad_inputs(glyph, tiny_cfg):
    with pytest.raises(ValueError, match="max_length"):
        tokenize("abc", 0)
    with pytest.raises(ValueError, match="prompts"):
        encode_glyphs(glyph, "not a list", "cpu", torch.float32)
    with pytest.raises(ValueError, match="mask shape"):
        glyph(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        GlyphEncoder(dataclasses.replace(tiny_cfg.glyph, feed_forward_proj="relu"))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        config_from_official({**config_to_official(tiny_cfg.glyph), "feed_forward_proj": "gated-silu"})


def test_trainable(tiny_cfg):
    torch.manual_seed(0)
    model = GlyphEncoder(tiny_cfg.glyph)
    ids = torch.randint(0, 384, (2, 6))
    model(ids, torch.tensor([[1] * 6, [1] * 3 + [0] * 3])).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
