"""The glyph-encoder folder (`text_encoder/`: transformers `T5EncoderModel` config.json + model.safetensors)
<-> `GlyphEncoder`.

Names are transformers' own except for the tied input embedding: `T5EncoderModel` has `shared.weight` and
`encoder.embed_tokens.weight` as one tensor (T5Config in transformers 5 always ties them). transformers 5
writes only `shared.weight`; older files may hold both. `GlyphEncoder` keeps one, `shared`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from glimage.checkpoint import (
    CheckpointError,
    build_on_meta,
    load_strict,
    read_config,
    read_state_dict,
    save_state_dict,
    write_json,
)
from glimage.config import GlyphConfig
from glimage.models.glyph import GlyphEncoder
from glimage.validate import InputError

WEIGHTS = "model.safetensors"
SHARED, EMBED = "shared.weight", "encoder.embed_tokens.weight"


def config_from_official(d: dict) -> GlyphConfig:
    """transformers T5 config dict -> GlyphConfig (ByT5 v1.1 encoder: gated-gelu, bidirectional buckets)."""
    ff = d.get("feed_forward_proj", "relu")
    if ff != "gated-gelu":
        raise InputError(f"unsupported text_encoder config: feed_forward_proj={ff!r} (supported: 'gated-gelu')")
    if d.get("dense_act_fn", "gelu_new") != "gelu_new":
        raise InputError(f"unsupported text_encoder config: dense_act_fn={d['dense_act_fn']!r} (supported: gelu_new)")
    if d.get("is_decoder", False):
        raise InputError("unsupported text_encoder config: is_decoder=True (the glyph encoder is bidirectional)")
    return GlyphConfig(
        vocab_size=d.get("vocab_size", 32128),
        d_model=d.get("d_model", 512),
        d_kv=d.get("d_kv", 64),
        d_ff=d.get("d_ff", 2048),
        num_layers=d.get("num_layers", 6),
        num_heads=d.get("num_heads", 8),
        relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=ff,
    )  # max_length is the pipeline's truncation (max_sequence_length), not part of this file


def config_to_official(cfg: GlyphConfig) -> dict:
    """GlyphConfig -> a config.json that transformers' `T5EncoderModel.from_pretrained` accepts."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "is_encoder_decoder": False,
        "is_decoder": False,
        "use_cache": False,
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official T5 state dict -> ours: the tied pair becomes `shared.weight`."""
    out = {k: v for k, v in sd.items() if k not in (SHARED, EMBED)}
    if EMBED in sd:
        # With both present and different, transformers does not tie them and T5Stack embeds with
        # `encoder.embed_tokens` (`shared` is then unused): take the one the forward pass reads.
        if SHARED in sd and sd[SHARED].shape != sd[EMBED].shape:
            raise CheckpointError(f"{SHARED} {tuple(sd[SHARED].shape)} and {EMBED} {tuple(sd[EMBED].shape)} differ")
        out[SHARED] = sd[EMBED]
    elif SHARED in sd:
        out[SHARED] = sd[SHARED]
    return out


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> what transformers 5 `save_pretrained` writes: `shared.weight` only (the tied copy is implied)."""
    return dict(sd)


def load_glyph_encoder(folder: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> GlyphEncoder:
    cfg = read_config(Path(folder) / "config.json", config_from_official)
    model = build_on_meta(lambda: GlyphEncoder(cfg), f"{Path(folder)}/config.json")

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        if dtype is None or not t.is_floating_point():
            return t
        # transformers' `_keep_in_fp32_modules = ["wo"]` applies when loading in fp16 (not bf16): reproduced.
        return t.float() if dtype == torch.float16 and key.endswith(".wo.weight") else t.to(dtype)

    sd = {k: cast(k, v) for k, v in read_state_dict(folder, device).items()}  # stored dtype, then cast
    load_strict(model, from_official(sd), what=f"text_encoder checkpoint {folder}")
    return model.eval()


def save_glyph_encoder(model: GlyphEncoder, folder: str | os.PathLike) -> None:
    folder = Path(folder)
    write_json(folder / "config.json", config_to_official(model.cfg))
    save_state_dict(to_official(model.state_dict()), folder, WEIGHTS)
