"""The reference GLM-Image (transformers 5.23.0 + diffusers 0.42.1) built offline as a test oracle.

Everything is built locally from our own config dataclasses (so the `tiny` preset and the oracle can
never drift apart): the GLM text tokenizer (byte-level BPE without merges, specials at their real ids,
the official chat template), the ByT5 tokenizer, the processor and all five models from seeded random
init. Tests then save it with the reference's `save_pretrained` and load that folder through glimage.
Test-only: glimage itself never imports transformers or diffusers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from glimage.config import GlmImageConfig

SEED = 1234

# Official processor/chat_template.jinja of zai-org/GLM-Image.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}\n{%- if m.content is string -%}\n{{ m.content }}\n{%- else -%}\n"
    "{%- for item in m.content -%}\n{%- if item.type == 'image' or item.get('image') is not none -%}\n"
    "<|dit_token_16384|><|image|><|dit_token_16385|>\n{%- elif item.type == 'text' -%}\n{{ item.text }}\n"
    "{%- endif -%}\n{%- endfor -%}\n{%- endif -%}\n{%- endfor -%}"
)


def reference_configs(cfg: GlmImageConfig) -> dict:
    ar, t = cfg.ar, cfg.ar.text
    ar_config = dict(
        image_token_id=ar.image_token_id, image_start_token_id=ar.image_start_token_id,
        image_end_token_id=ar.image_end_token_id, tie_word_embeddings=False,
        text_config=dict(
            vocab_size=t.vocab_size, vision_vocab_size=t.vision_vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
            attention_bias=t.attention_bias, pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id,
            rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section),
                                 partial_rotary_factor=t.partial_rotary_factor)),
        vision_config=dict(depth=ar.vision.depth, hidden_size=ar.vision.hidden_size, num_heads=ar.vision.num_heads,
                           intermediate_size=ar.vision.intermediate_size, patch_size=ar.vision.patch_size,
                           image_size=ar.vision.image_size, in_channels=ar.vision.in_channels, hidden_act="gelu",
                           attention_bias=ar.vision.attention_bias, layer_norm_eps=ar.vision.layer_norm_eps,
                           spatial_merge_size=1),
        vq_config=dict(embed_dim=ar.vq.embed_dim, num_embeddings=ar.vq.num_embeddings,
                       latent_channels=ar.vq.latent_channels, in_channels=3),
    )
    g = cfg.glyph
    t5_config = dict(vocab_size=g.vocab_size, d_model=g.d_model, d_kv=g.d_kv, d_ff=g.d_ff, num_layers=g.num_layers,
                     num_heads=g.num_heads, feed_forward_proj=g.feed_forward_proj, is_encoder_decoder=False,
                     dropout_rate=0.0, relative_attention_num_buckets=g.relative_attention_num_buckets,
                     relative_attention_max_distance=g.relative_attention_max_distance,
                     layer_norm_epsilon=g.layer_norm_epsilon)
    dit_config = dataclasses.asdict(cfg.dit)
    v = cfg.vae
    n = len(v.block_out_channels)
    vae_config = dict(in_channels=v.in_channels, out_channels=v.out_channels, latent_channels=v.latent_channels,
                      block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
                      norm_num_groups=v.norm_num_groups, down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n, mid_block_add_attention=v.mid_block_add_attention,
                      use_quant_conv=False, use_post_quant_conv=False, sample_size=64,
                      latents_mean=list(v.latents_mean), latents_std=list(v.latents_std))
    s = cfg.scheduler
    sched_config = dict(num_train_timesteps=s.num_train_timesteps, use_dynamic_shifting=True,
                        time_shift_type=s.time_shift_type, base_image_seq_len=s.base_image_seq_len,
                        base_shift=s.base_shift, max_shift=s.max_shift, max_image_seq_len=4096, shift=1.0)
    return dict(ar=ar_config, t5=t5_config, dit=dit_config, vae=vae_config, scheduler=sched_config)


def build_glm_tokenizer():
    """glimage's byte-level tokenizer (specials at their real ids) wrapped as the reference expects."""
    from transformers import PreTrainedTokenizerFast

    from glimage.prompt import build_byte_tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=build_byte_tokenizer(), bos_token="<|dit_token_16384|>", eos_token="<|dit_token_16385|>",
        pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )


def build_reference_pipeline(cfg: GlmImageConfig):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (ByT5Tokenizer, GlmImageConfig as RefConfig, GlmImageForConditionalGeneration,
                              GlmImageProcessor, T5Config, T5EncoderModel)
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    c = reference_configs(cfg)
    torch.manual_seed(SEED)
    vle = GlmImageForConditionalGeneration(RefConfig(**c["ar"])).eval()
    vle.generation_config.update(do_sample=True, temperature=cfg.ar.temperature, top_p=cfg.ar.top_p)
    torch.manual_seed(SEED + 1)
    text_encoder = T5EncoderModel(T5Config(**c["t5"])).eval()
    torch.manual_seed(SEED + 2)
    transformer = GlmImageTransformer2DModel(**c["dit"]).eval()
    torch.manual_seed(SEED + 3)
    vae = AutoencoderKL(**c["vae"]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**c["scheduler"])
    image_processor = GlmImageImageProcessorPil(
        patch_size=cfg.ar.vision.patch_size, temporal_patch_size=1, merge_size=1,
        min_pixels=cfg.ar.source_min_pixels, max_pixels=cfg.ar.source_max_pixels,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3, do_resize=True,
        do_rescale=True, do_normalize=True)
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=build_glm_tokenizer(),
                                  chat_template=CHAT_TEMPLATE)
    patch_i2i_version_skew(vle)
    pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=processor, text_encoder=text_encoder,
                            vision_language_encoder=vle, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def patch_i2i_version_skew(vle):
    """REFERENCE BUG (diffusers 0.42.1 x transformers 5.23.0): `generate_prior_tokens` does
    torch.cat(get_image_features(...).pooler_output, 0) on transformers' list of [C,h,w] maps, so
    get_image_tokens then iterates over channels -> conv2d error. Restore the per-image split."""
    orig = vle.get_image_tokens
    c = vle.config.vq_config.latent_channels

    def get_image_tokens(hidden_states, image_grid_thw=None):
        if torch.is_tensor(hidden_states) and hidden_states.ndim == 3:
            hidden_states = list(hidden_states.split(c, dim=0))
        return orig(hidden_states, image_grid_thw)

    vle.get_image_tokens = get_image_tokens


def random_image(h: int, w: int, seed: int = SEED) -> Image.Image:
    """A smooth random RGB image (low-frequency noise survives resizing, like a photo)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def reference_prompt_inputs(pipe, prompts, height, width, images=None):
    """What the reference's generate_prior_tokens feeds the AR model (processor output)."""
    msgs = []
    for i, p in enumerate(prompts):
        content = [{"type": "image", "image": im} for im in (images[i] if images else [])]
        content.append({"type": "text", "text": p})
        msgs.append([{"role": "user", "content": content}])
    return pipe.processor.apply_chat_template(msgs, tokenize=True, padding=len(prompts) > 1, target_h=height,
                                              target_w=width, return_dict=True, return_tensors="pt")
