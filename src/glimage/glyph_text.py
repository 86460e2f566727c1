"""Glyph text: quoted spans of the prompt -> ByT5 byte ids -> T5 hidden states, the DiT's only text input.

Reproduces `GlmImagePipeline.get_glyph_texts` / `_get_glyph_embeds` / `encode_prompt` (diffusers 0.42.1) and
transformers' `ByT5Tokenizer` (5.23.0) without importing either:

* spans are found per quote kind in a fixed order: every `'…'` span first, then `“…”`, then `"…"`, then `「…」`
  (not in order of appearance); a prompt without spans encodes the empty string (eos only);
* a span is its UTF-8 bytes + 3 (pad 0, eos 1, unk 2; `<extra_id_i>` = 259 + i), truncated to `max_length`
  tokens including the appended eos;
* every span of a prompt is encoded in one padded batch, the valid rows of all spans are concatenated into one
  sequence, and the prompts of a batch are left-padded with zero vectors to the longest.
"""

from __future__ import annotations

import re

import torch

from glimage.models.glyph import GlyphEncoder

from .validate import InputError

PAD, EOS, UNK = 0, 1, 2
OFFSET = 3  # byte b -> id b + 3
NUM_EXTRA_IDS = 125  # <extra_id_0..124> -> 259..383 (transformers 5 numbering; older versions counted down)

# Quote kinds in the reference's order; the spans of one kind all come before those of the next kind.
QUOTE_PATTERNS = (r"'([^']*)'", r"\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', r"「([^「」]*)」")

# ByT5Tokenizer's added tokens are matched in the text before byte splitting. pad/eos/unk are
# AddedToken(lstrip=True, rstrip=True): whitespace around them is dropped; the sentinels keep it.
_STRIP_TOKENS = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
_SPECIAL_TOKENS = {**_STRIP_TOKENS, **{f"<extra_id_{i}>": 256 + OFFSET + i for i in range(NUM_EXTRA_IDS)}}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in _SPECIAL_TOKENS) + ")")


def glyph_texts(prompt: str) -> list[str]:
    """The quoted spans of one prompt, in the reference's order (possibly empty strings, e.g. for `''`)."""
    return [span for pattern in QUOTE_PATTERNS for span in re.findall(pattern, prompt)]


def tokenize(text: str, max_length: int) -> list[int]:
    """ByT5 ids of `text` plus eos, truncated to `max_length` ids in all (like `tokenizer(text, max_length,
    truncation=True)`)."""
    if max_length < 1:
        raise InputError(f"max_length must be >= 1 (room for the eos token), got {max_length}")
    # No special token can be a prefix of another (all end in '>'), so a regex split equals the reference's trie.
    pieces = _SPECIAL_RE.split(text)  # odd indices are special tokens
    for i in range(1, len(pieces), 2):
        if pieces[i] in _STRIP_TOKENS:
            pieces[i - 1] = pieces[i - 1].rstrip()
            if i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids.append(_SPECIAL_TOKENS[piece])
        else:
            ids.extend(b + OFFSET for b in piece.encode("utf-8"))
    # Truncation keeps room for one eos; the eos is then appended unless the (truncated) ids already end in one.
    ids = ids[: max_length - 1]
    return ids if ids and ids[-1] == EOS else ids + [EOS]


def glyph_token_ids(prompt: str, max_length: int) -> list[list[int]]:
    """The ids of every span of `prompt` ([""] when there is none), as the reference feeds them to T5."""
    ids = [tokenize(t, max_length) for t in glyph_texts(prompt) or [""]]
    # REFERENCE QUIRK (pipeline_glm_image.py `_get_glyph_embeds`): `[pad] * ((len(input_ids) + 1) % 2)` uses the
    # number of spans, not a span's length: when a prompt has an EVEN number of spans, one pad id is prepended to
    # EVERY span, and that pad is marked valid (attention mask 1) so its hidden state reaches the DiT.
    pad = [PAD] * ((len(ids) + 1) % 2)
    return [pad + x for x in ids]


def encode_glyphs(encoder: GlyphEncoder, prompts: list[str], device: torch.device | str,
                  dtype: torch.dtype, max_length: int | None = None) -> torch.Tensor:
    """Glyph embeddings of a batch of prompts -> (B, T, d_model), left-padded with zeros to the longest prompt.

    The negative (unconditional) embeddings of the pipeline are `encode_glyphs(encoder, [""] * B, ...)`: a single
    eos token per prompt. Like the reference, T5 runs once per prompt (on all of that prompt's spans): batching
    prompts together would change results in the last bit through different matmul shapes, and T5 is cheap.
    """
    if isinstance(prompts, str) or not prompts:
        raise InputError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    max_length = encoder.cfg.max_length if max_length is None else max_length
    embeds = []
    for prompt in prompts:
        spans = glyph_token_ids(prompt, max_length)
        L = max(len(x) for x in spans)
        ids = torch.tensor([x + [PAD] * (L - len(x)) for x in spans], device=device)  # (S, L), right-padded
        mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in spans], device=device)  # (S, L)
        hidden = encoder(ids, mask)  # (S, L, D), in the encoder's dtype
        embeds.append(hidden[mask.bool()])  # (T_i, D): the valid rows of every span, concatenated in order
    T = max(e.shape[0] for e in embeds)
    out = torch.stack([torch.cat([e.new_zeros(T - e.shape[0], e.shape[1]), e]) for e in embeds])  # left pad
    return out.to(device=device, dtype=dtype)  # (B, T, D)
