"""Frozen configs for every GLM-Image component, and the named presets.

Field names follow the official `config.json` files of the checkpoint folder so that reading and writing
them is a plain field copy (see `checkpoint.py`). `PRESETS["glm-image"]` holds the official values;
`PRESETS["tiny"]` keeps the same structure and token-id layout at toy widths (it is the configuration
the parity tests build the reference with).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .validate import InputError


@dataclass(frozen=True)
class TextConfig:
    """GLM-4 decoder of the AR generator (`vision_language_encoder/config.json: text_config`)."""

    vocab_size: int = 168064  # 0..16511 visual ids, then GLM-4 text ids + 16512
    vision_vocab_size: int = 16512  # lm_head width: the model only ever predicts visual ids
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    rope_theta: float = 10000.0
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 131072
    pad_token_id: int = 167841
    eos_token_id: int = 16385

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise InputError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise InputError(f"heads {self.num_attention_heads} not divisible by kv heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            raise InputError(f"mrope_section {self.mrope_section} must sum to rotary_dim/2 = {self.rotary_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class VisionConfig:
    """ViT of the semantic-VQ image tokenizer (`vision_config`)."""

    depth: int = 40
    hidden_size: int = 1536
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 16
    image_size: int = 2048  # learned position table covers image_size/patch_size per side
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True


@dataclass(frozen=True)
class VQConfig:
    """Codebook of the semantic-VQ tokenizer (`vq_config`)."""

    embed_dim: int = 2048
    num_embeddings: int = 16384
    latent_channels: int = 1536


@dataclass(frozen=True)
class ARConfig:
    """The AR generator plus the prompt/grid conventions the pipeline builds around it."""

    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    image_token_id: int = 167855  # <|image|> placeholder, replaced by a source image's VQ ids
    image_start_token_id: int = 16384  # also the tokenizer's bos
    image_end_token_id: int = 16385  # also eos
    # Id layout of glimage's byte-level tokenizer (models trained here; the official model ships GLM-4's BPE):
    # text byte k -> text_token_offset + k; grid tokens <sop>/<eop> at these ids; pad is text.pad_token_id.
    # The official values put them where GLM-4 has them; a compact layout lets a small model drop the
    # 168064-row embedding.
    text_token_offset: int = 16512
    grid_bos_token_id: int = 167845
    grid_eos_token_id: int = 167846
    # Grid conventions (the official processor hard-codes them; small presets scale them).
    grid_factor: int = 32  # pixels per large-grid token: 1024 px -> 32 tokens
    preview_side: int = 16  # preview grid has ~preview_side^2 tokens whatever the aspect ratio
    # Source-image preprocessing (`processor/preprocessor_config.json`)
    source_min_pixels: int = 512 * 512
    source_max_pixels: int = 2048 * 2048
    # Supported target sizes: None = whatever works (a multiple of grid_factor, a non-empty preview grid, the
    # tokens within the context). Zhipu's range for the official model, [512, 2048], is set by its preset and
    # by convert.ar for the published checkpoint; a folder's glimage.json may state one for its model.
    min_size: int | None = None
    max_size: int | None = None
    max_aspect_ratio: float = 4.0  # of source images (the reference processor's rule)
    # Sampling defaults (`generation_config.json`; transformers' implicit top_k=50 applies when unset)
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.75

    @property
    def size_range(self) -> tuple[int, int]:
        """(smallest, largest) side of a target image: the folder's stated range, else the largest side of any
        image whose tokens fit the AR's context (derived, so that every model has one)."""
        lo = self.min_size if self.min_size is not None else self.grid_factor
        return lo, self.max_size if self.max_size is not None else self.largest_side(lo)

    def image_tokens(self, height: int, width: int, text_to_image: bool = True) -> int:
        """Tokens the AR generates for a height x width image: the large grid, the preview grid (text-to-image)
        and the closing token. Plain arithmetic: a size is refused on it before anything is allocated."""
        th, tw = height // self.grid_factor, width // self.grid_factor
        if not text_to_image:
            return th * tw + 1
        ph, pw = int(math.sqrt(th / tw) * self.preview_side), int(math.sqrt(tw / th) * self.preview_side)
        return th * tw + ph * pw + 1

    def largest_side(self, lo: int) -> int:
        """The longest side (a multiple of grid_factor) of an image that fits the context with a one-token
        prompt: its other side as short as the preview grid's aspect limit and `lo` allow."""
        f, limit = self.grid_factor, self.text.max_position_embeddings - 1

        def fits(n: int) -> bool:  # n grid rows, the fewest columns allowed
            cols = max(-(-lo // f), -(-n // self.preview_side ** 2))
            return n >= cols and self.image_tokens(n * f, cols * f) <= limit

        good, bad = 0, limit + 1  # the tokens grow with the side: bisect
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return max(good, 1) * f

    def __post_init__(self):
        if self.vq.num_embeddings > self.image_start_token_id:
            raise InputError(
                f"codebook size {self.vq.num_embeddings} overlaps the image start id {self.image_start_token_id}")
        specials = self.special_token_ids
        bytes_ = range(self.text_token_offset, self.text_token_offset + 256)
        clash = [i for i in specials.values() if i in bytes_ or i < self.vq.num_embeddings]
        if len(set(specials.values())) != len(specials) or clash:
            raise InputError(f"special token ids {specials} collide with each other, the codebook "
                             f"[0, {self.vq.num_embeddings}) or the text bytes [{bytes_.start}, {bytes_.stop})")
        top = max([*specials.values(), bytes_.stop - 1])
        if top >= self.text.vocab_size:
            raise InputError(f"token id {top} does not fit the embedding of {self.text.vocab_size} rows")

    @property
    def special_token_ids(self) -> dict[str, int]:
        return {"<|dit_token_16384|>": self.image_start_token_id, "<|dit_token_16385|>": self.image_end_token_id,
                "<|endoftext|>": self.text.pad_token_id, "<sop>": self.grid_bos_token_id,
                "<eop>": self.grid_eos_token_id, "<|image|>": self.image_token_id}


@dataclass(frozen=True)
class GlyphConfig:
    """ByT5 (T5 encoder) glyph encoder (`text_encoder/config.json`)."""

    vocab_size: int = 384
    d_model: int = 1472
    d_kv: int = 64
    d_ff: int = 3584
    num_layers: int = 12
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    max_length: int = 2048  # per quoted span, like the reference's tokenizer truncation


@dataclass(frozen=True)
class DiTConfig:
    """Single-stream DiT decoder (`transformer/config.json`)."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    text_embed_dim: int = 1472
    time_embed_dim: int = 512
    condition_dim: int = 256
    prior_vq_quantizer_codebook_size: int = 16384

    @property
    def inner_dim(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (`vae/config.json`); 4 levels => 8x downsampling."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 512, 1024, 1024)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    mid_block_add_attention: bool = False
    # Per-channel latent statistics. The official values live in the checkpoint's vae/config.json and are
    # read from there; None means "identity" (mean 0, std 1) for presets built without a checkpoint.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SchedulerConfig:
    """Flow-matching schedule (`scheduler/scheduler_config.json`)."""

    num_train_timesteps: int = 1000
    base_image_seq_len: int = 256
    base_shift: float = 0.25
    max_shift: float = 0.75
    time_shift_type: str = "linear"  # or "exponential"; official value unconfirmed, so both are supported

    def __post_init__(self):
        if self.time_shift_type not in ("linear", "exponential"):
            raise InputError(f"time_shift_type must be 'linear' or 'exponential', got {self.time_shift_type!r}")


@dataclass(frozen=True)
class GlmImageConfig:
    ar: ARConfig = field(default_factory=ARConfig)
    glyph: GlyphConfig = field(default_factory=GlyphConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def replace(cfg, **changes):
    """dataclasses.replace that also reaches into nested configs: replace(cfg, **{"ar.text.hidden_size": 8})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)


TINY = GlmImageConfig(
    ar=ARConfig(
        text=TextConfig(vision_vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096),
        vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, image_size=256),
        vq=VQConfig(embed_dim=32, latent_channels=32),
        source_min_pixels=32 * 32, source_max_pixels=128 * 128,
    ),
    glyph=GlyphConfig(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    dit=DiTConfig(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  text_embed_dim=32, time_embed_dim=16, condition_dim=8),
    vae=VAEConfig(latent_channels=4, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4,
                  latents_mean=(0.1, -0.2, 0.3, -0.4), latents_std=(1.5, 2.0, 2.5, 3.0)),
)

# The shipped default model (trained from scratch on the `shapes` set by the shapes-* recipes): the official
# structure at 128 px scale. Geometry: VAE x4 (3 levels) and DiT patch 2 give a 16x16 DiT grid, so the large
# VQ grid is 8x8 (grid_factor 16 = ViT patch 16) and the prior upsamples x2 to the DiT grid as officially;
# a 4x4 preview. Compact id layout (codebook 1024, then image start/end, text bytes, specials): the embedding
# has 1292 rows instead of 168064.
SHAPES = GlmImageConfig(
    ar=ARConfig(
        text=TextConfig(vocab_size=1292, vision_vocab_size=1032, hidden_size=256, intermediate_size=640,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                        max_position_embeddings=1024, pad_token_id=1291, eos_token_id=1025),
        vision=VisionConfig(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, image_size=256),
        vq=VQConfig(embed_dim=64, num_embeddings=1024, latent_channels=128),
        image_token_id=1290, image_start_token_id=1024, image_end_token_id=1025, text_token_offset=1032,
        grid_bos_token_id=1288, grid_eos_token_id=1289, grid_factor=16, preview_side=4,
        source_min_pixels=64 * 64, source_max_pixels=256 * 256,
    ),
    glyph=GlyphConfig(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    dit=DiTConfig(in_channels=8, out_channels=8, num_layers=6, attention_head_dim=32, num_attention_heads=4,
                  text_embed_dim=64, time_embed_dim=128, condition_dim=32, prior_vq_quantizer_codebook_size=1024),
    vae=VAEConfig(latent_channels=8, block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8),
)

# A middle size for CPU benchmarks (`glimage bench --preset mid`, 256x256): the tiny structure with a 4 x 512
# AR and a 4 x 512 DiT, where the math, not Python, starts to dominate.
MID = replace(TINY, **{"ar.text.hidden_size": 512, "ar.text.intermediate_size": 1376, "ar.text.num_hidden_layers": 4,
                       "ar.text.num_attention_heads": 8, "ar.text.num_key_value_heads": 2,
                       "ar.text.mrope_section": (4, 6, 6), "dit.num_layers": 4, "dit.attention_head_dim": 64,
                       "dit.num_attention_heads": 8, "dit.time_embed_dim": 64, "dit.condition_dim": 32,
                       "vae.block_out_channels": (32, 64, 128, 128), "vae.norm_num_groups": 8})

OFFICIAL_SIZE_RANGE = (512, 2048)  # Zhipu's supported sides for the published model

OFFICIAL = GlmImageConfig(ar=ARConfig(min_size=OFFICIAL_SIZE_RANGE[0], max_size=OFFICIAL_SIZE_RANGE[1]))
# The official model at its real widths (every width, vocabulary, codebook, rope setting, VAE and processor
# range) but 2 layers per stack: ~1.9 B parameters, so that speed at the widths users run can be measured and
# compared with the reference on a CPU (`glimage bench --preset slice --compare-reference`).
# The latent statistics are the folder's (16 per-channel values); identity ones stand in for them here.
SLICE = replace(OFFICIAL, **{"ar.text.num_hidden_layers": 2, "ar.vision.depth": 2, "glyph.num_layers": 2,
                             "dit.num_layers": 2, "vae.latents_mean": (0.0,) * 16, "vae.latents_std": (1.0,) * 16})

PRESETS: dict[str, GlmImageConfig] = {
    "glm-image": OFFICIAL,
    "slice": SLICE,
    "tiny": TINY,
    "mid": MID,
    "shapes": SHAPES,
}


def get_preset(name: str) -> GlmImageConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; available: {sorted(PRESETS)}", "preset")
    return PRESETS[name]
