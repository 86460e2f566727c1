"""The decoder stage's glyph_prior options: samples that quote text lose (drop) or exchange (swap) their prior
tokens and keep their glyphs, so that the DiT must read the letters from the glyph encoder."""

import pytest
import torch

from test_train_stages import DATA, stage_for


def first_decoder_call(tmp_path, **kw) -> tuple[tuple, dict]:
    """The (args, kwargs) of the model's first forward in one decoder step on DATA[:12] (no condition dropout)."""
    st = stage_for("decoder", tmp_path, cond_drop=0.0, **kw)
    model = st.build()
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: calls.append((a, k)) or forward(*a, **k)
    st.step(model, st.collate(DATA[:12]), torch.Generator().manual_seed(3))
    return calls[0]


def test_decoder_glyph_prior_drop_hides_tokens_of_quoted_text_only(tmp_path):
    """glyph_prior_drop: samples that quote text lose about that share of their prior tokens and keep their
    glyphs; the others, and the whole step when it is 0, are as before (same random stream)."""
    (x0, g0, p0, d0, *_), k0 = first_decoder_call(tmp_path)
    (x1, g1, p1, d1, *_), k1 = first_decoder_call(tmp_path, glyph_prior_drop=0.5)
    m0, m1 = k0["glyph_mask"], k1["glyph_mask"]
    quoted = torch.tensor(['"' in d["text"] for d in DATA[:12]])
    assert 0 < int(quoted.sum()) < 12 and not d0.any()
    assert torch.equal(x0, x1) and torch.equal(p0, p1)
    assert not d1[~quoted].any() and 0.2 < d1[quoted].float().mean() < 0.8
    for b in range(12):  # glyphs unchanged
        torch.testing.assert_close(g1[b][m1[b]] if m1 is not None else g1[b], g0[b][m0[b]] if m0 is not None else g0[b])
    with pytest.raises(ValueError, match="glyph_prior_drop"):
        stage_for("decoder", tmp_path, glyph_prior_drop=1.5)


def test_decoder_glyph_prior_swap_passes_sign_tokens_round(tmp_path):
    """glyph_prior_swap = 1: every sample that quotes text gets the prior tokens of another such sample (a cycle)
    and keeps its glyphs and noised latents; the other samples keep their own tokens."""
    (x0, g0, p0, *_), _ = first_decoder_call(tmp_path)
    (x1, g1, p1, *_), _ = first_decoder_call(tmp_path, glyph_prior_swap=1.0)
    quoted = [i for i, d in enumerate(DATA[:12]) if '"' in d["text"]]
    assert len(quoted) > 1 and torch.equal(x0, x1) and torch.equal(g0, g1)
    others = [i for i in range(12) if i not in quoted]
    assert torch.equal(p1[others], p0[others])
    assert torch.equal(p1[quoted], p0[quoted[1:] + quoted[:1]])
    assert not torch.equal(p1[quoted], p0[quoted])
    with pytest.raises(ValueError, match="glyph_prior_swap"):
        stage_for("decoder", tmp_path, glyph_prior_swap=-0.1)
