"""Text side of the AR generator: the GLM tokenizer, size rules, and the official prompt layout.

Text-to-image:  {prompt}<sop>{H/f} {W/f}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>
Image-to-image: <|dit_token_16384|><|image|>*n<|dit_token_16385|> ... {prompt}<sop>{H/f} {W/f}<eop><|dit_token_16384|>
(f = grid factor, 32 officially). The source spans come first, as the official chat template puts image
items before the text item. Batches are left-padded with the pad token, like the reference processor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import read_json
from .config import ARConfig
from .positions import decode_positions, prompt_positions
from .validate import InputError


def target_grids(height: int, width: int, cfg: ARConfig) -> tuple[int, int, int, int]:
    """(th, tw) of the large grid and (ph, pw) of the preview grid (~preview_side^2 tokens)."""
    f = cfg.grid_factor
    th, tw = height // f, width // f
    r = th / tw
    return th, tw, int(math.sqrt(r) * cfg.preview_side), int(math.sqrt(1 / r) * cfg.preview_side)


SPECIAL_ROLES = {"bos_token": "<|dit_token_16384|>", "eos_token": "<|dit_token_16385|>", "pad_token": "<|endoftext|>",
                 "image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"}


def build_byte_tokenizer(cfg: ARConfig | None = None) -> Tokenizer:
    """A byte-level tokenizer with GLM-Image's special tokens, ids from `cfg`'s layout (official by default:
    text bytes -> 16512 + rank, specials at their GLM-4 ids).

    For models trained here (and tests): the GLM-4 vocabulary is not needed to describe synthetic scenes.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    cfg = cfg or ARConfig()
    specials = cfg.special_token_ids
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: cfg.text_token_offset + i for i, ch in enumerate(alphabet)}
    vocab.update(specials)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tk


class GlmTokenizer:
    """The GLM-4 byte-level BPE of `processor/tokenizer.json`, with the special tokens GLM-Image uses."""

    def __init__(self, tokenizer: Tokenizer, special: dict[str, str]):
        self.tk = tokenizer
        self.special = special
        ids = {k: tokenizer.token_to_id(v) for k, v in special.items()}
        missing = [special[k] for k, i in ids.items() if i is None]
        if missing:
            raise InputError(f"tokenizer lacks the special tokens {missing}")
        self.image_start_id, self.image_end_id = ids["bos_token"], ids["eos_token"]
        self.image_id, self.pad_id = ids["image_token"], ids["pad_token"]
        self.grid_bos_id, self.grid_eos_id = ids["grid_bos_token"], ids["grid_eos_token"]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "GlmTokenizer":
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise InputError(f"no tokenizer.json in {folder}")
        special = dict(SPECIAL_ROLES)
        if (folder / "tokenizer_config.json").is_file():
            conf = read_json(folder / "tokenizer_config.json")
            for k in special:
                v = conf.get(k)
                special[k] = v["content"] if isinstance(v, dict) else (v or special[k])
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), special)

    @classmethod
    def byte_level(cls, cfg: ARConfig | None = None) -> "GlmTokenizer":
        return cls(build_byte_tokenizer(cfg), dict(SPECIAL_ROLES))

    def save(self, folder: str | os.PathLike) -> None:
        from .checkpoint import write_json
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.tk.save(str(Path(folder) / "tokenizer.json"))
        write_json(Path(folder) / "tokenizer_config.json", dict(self.special, padding_side="left",
                                                                 tokenizer_class="TokenizersBackend",
                                                                 processor_class="GlmImageProcessor"))

    def encode(self, text: str) -> list[int]:
        # tokenizer.json's own post-processor applies, as in the reference's fast tokenizer
        return self.tk.encode(text).ids


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, L) left-padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    position_ids: torch.Tensor  # (3, B, L); pads get position 1 like the reference (they are never attended)
    decode_position_ids: torch.Tensor  # (B, 3, n_new)
    grids: list[tuple[int, int]]  # grids to generate, in generation order
    large_grid: tuple[int, int]
    large_offset: int  # index of the large grid's first token among the generated ones


def _new_tokens(height: int, width: int, cfg: ARConfig, t2i: bool) -> int:
    return cfg.image_tokens(height, width, t2i)


def layout_text(prompt: str, n_images: int, th: int, tw: int, ph: int, pw: int, tok: GlmTokenizer) -> str:
    s = tok.special
    images = f"{s['bos_token']}{s['image_token']}{s['eos_token']}" * n_images
    grids = f"{s['grid_bos_token']}{th} {tw}{s['grid_eos_token']}"
    if n_images == 0:
        grids += f"{s['grid_bos_token']}{ph} {pw}{s['grid_eos_token']}"
    return f"{images}{prompt}{grids}{s['bos_token']}"


def build_prompts(prompts: list[str], height: int, width: int, tok: GlmTokenizer, cfg: ARConfig,
                  source_grids: list[list[tuple[int, int]]] | None = None) -> PromptBatch:
    """Token ids and MRoPE positions for a batch; source_grids[b] = VQ grid sizes of sample b's images."""
    source_grids = source_grids or [[] for _ in prompts]
    if len({len(g) for g in source_grids}) > 1:
        raise InputError(f"every prompt needs the same number of source images, got {[len(g) for g in source_grids]}")
    th, tw, ph, pw = target_grids(height, width, cfg)
    t2i = len(source_grids[0]) == 0
    grids = [(ph, pw), (th, tw)] if t2i else [(th, tw)]
    rows = []
    for prompt, sg in zip(prompts, source_grids):
        # expand each <|image|> to its grid's token count (placeholders, replaced by VQ ids later)
        expanded, k = [], 0
        for t in tok.encode(layout_text(prompt, len(sg), th, tw, ph, pw, tok)):
            if t == tok.image_id:
                gh, gw = sg[k]
                expanded += [tok.image_id] * (gh * gw)
                k += 1
            else:
                expanded.append(t)
        rows.append(expanded)
    L = max(len(r) for r in rows)
    n_new = sum(h * w for h, w in grids) + 1
    limit = cfg.text.max_position_embeddings
    if L + n_new > limit:  # before any position tensor is built: their size is that of the request
        if n_new < limit:
            raise InputError(f"prompt is {L} tokens long; with the {n_new} image tokens to generate that exceeds the "
                             f"model's context of {limit} tokens (at most {limit - n_new} prompt tokens at "
                             f"{height}x{width}): shorten the prompt", "prompt")
        side = cfg.grid_factor
        while _new_tokens(side + cfg.grid_factor, side + cfg.grid_factor, cfg, t2i) + L <= limit:
            side += cfg.grid_factor
        raise InputError(f"{height}x{width} needs {n_new} image tokens, beyond the model's context of {limit} tokens "
                         f"(with this {L}-token prompt the largest square is {side}x{side})", "size")
    positions, decodes = [], []
    for r, sg in zip(rows, source_grids):
        pos, nxt = prompt_positions(r, sg, tok.image_start_id, tok.image_end_id)
        positions.append(pos)
        decodes.append(decode_positions(nxt, grids))
    B = len(rows)
    input_ids = torch.full((B, L), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    position_ids = torch.ones((3, B, L), dtype=torch.long)
    for b, (r, p) in enumerate(zip(rows, positions)):
        input_ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
        position_ids[:, b, L - len(r):] = p
    return PromptBatch(input_ids, mask, position_ids, torch.stack(decodes), grids, (th, tw),
                       ph * pw if t2i else 0)


# Official processor/chat_template.jinja of zai-org/GLM-Image (image items become the image span placeholders).
CHAT_TEMPLATE = (
    "{%- for m in messages -%}\n{%- if m.content is string -%}\n{{ m.content }}\n{%- else -%}\n"
    "{%- for item in m.content -%}\n{%- if item.type == 'image' or item.get('image') is not none -%}\n"
    "<|dit_token_16384|><|image|><|dit_token_16385|>\n{%- elif item.type == 'text' -%}\n{{ item.text }}\n"
    "{%- endif -%}\n{%- endfor -%}\n{%- endif -%}\n{%- endfor -%}"
)
