"""The AR part of the official folder (`vision_language_encoder/`, `processor/`) <-> `GlmImageAR`.

Our module names equal the checkpoint's without the `model.` prefix of transformers'
`GlmImageForConditionalGeneration`, so the key map is that prefix alone (lm_head sits outside it).
Fields the official files do not carry (grid factor, preview size, size limits) are the official
defaults; presets that change them write `glimage.json` beside `config.json`. A folder with the published
architecture and no stated size range gets Zhipu's, [512, 2048]; any other folder draws every size that
works (see validate.check_target_size).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..checkpoint import (
    build_on_meta,
    load_strict,
    read_config,
    read_json,
    read_state_dict,
    rename,
    save_state_dict,
    write_json,
)
from ..config import OFFICIAL_SIZE_RANGE, ARConfig, TextConfig, VisionConfig, VQConfig
from ..models.ar import GlmImageAR
from ..validate import InputError

PREFIXED = ("visual.", "language_model.", "vqmodel.")
EXTRA_FIELDS = ("grid_factor", "preview_side", "min_size", "max_size", "max_aspect_ratio", "text_token_offset",
                "grid_bos_token_id", "grid_eos_token_id")


def from_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename(sd, lambda k: k[len("model."):] if k.startswith("model.") else k)


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename(sd, lambda k: "model." + k if k.startswith(PREFIXED) else k)


def _pick(cls, d: dict, **renames):
    names = {f.name for f in dataclasses.fields(cls)}
    out = {f: d[src] for f, src in renames.items() if src in d}
    out.update({k: v for k, v in d.items() if k in names and k not in out})
    return out


def config_from_official(d: dict, processor: dict | None = None, generation: dict | None = None,
                         extra: dict | None = None) -> ARConfig:
    t = dict(d.get("text_config", {}))
    rope = t.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"unsupported rope_type {rope['rope_type']!r} (GLM-Image uses 'default')")
    t.update({k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope})
    if "mrope_section" in rope:
        t["mrope_section"] = tuple(rope["mrope_section"])
    text = TextConfig(**_pick(TextConfig, t))
    vision = VisionConfig(**_pick(VisionConfig, d.get("vision_config", {})))
    vq = VQConfig(**_pick(VQConfig, d.get("vq_config", {})))
    kw = _pick(ARConfig, {k: v for k, v in d.items() if k.endswith("_token_id")})
    if processor:
        ip = processor.get("image_processor", processor)
        size = ip.get("size") or {}
        kw["source_min_pixels"] = ip.get("min_pixels", size.get("shortest_edge", ARConfig.source_min_pixels))
        kw["source_max_pixels"] = ip.get("max_pixels", size.get("longest_edge", ARConfig.source_max_pixels))
        if ip.get("patch_size", vision.patch_size) != vision.patch_size or ip.get("merge_size", 1) != 1:
            raise InputError(f"processor patch/merge {ip.get('patch_size')}/{ip.get('merge_size')} do not match "
                             f"the vision encoder's patch {vision.patch_size} with merge 1")
    if generation:
        for k in ("temperature", "top_k", "top_p"):
            if generation.get(k) is not None:
                kw[k] = generation[k]
    kw.update({k: v for k, v in (extra or {}).items() if k in EXTRA_FIELDS})
    if "min_size" not in kw and "max_size" not in kw and _published(text, vision, vq):
        kw["min_size"], kw["max_size"] = OFFICIAL_SIZE_RANGE
    return ARConfig(text=text, vision=vision, vq=vq, **kw)


def _published(text: TextConfig, vision: VisionConfig, vq: VQConfig) -> bool:
    """The architecture of zai-org/GLM-Image (its widths and depths; minor fields may vary between uploads)."""
    shape = lambda t, v, q: (t.hidden_size, t.num_hidden_layers, v.depth, v.hidden_size, q.num_embeddings)  # noqa: E731
    return shape(text, vision, vq) == shape(TextConfig(), VisionConfig(), VQConfig())


def config_to_official(cfg: ARConfig) -> dict:
    t = dataclasses.asdict(cfg.text)
    t["rope_parameters"] = dict(rope_type="default", rope_theta=t.pop("rope_theta"),
                                mrope_section=list(t.pop("mrope_section")),
                                partial_rotary_factor=t.pop("partial_rotary_factor"))
    t.update(hidden_act="silu", model_type="glm_image_text")
    vision = dict(dataclasses.asdict(cfg.vision), hidden_act="gelu", spatial_merge_size=1,
                  model_type="glm_image_vision")
    vq = dict(dataclasses.asdict(cfg.vq), in_channels=3, model_type="glm_image_vqmodel")
    return dict(architectures=["GlmImageForConditionalGeneration"], model_type="glm_image", text_config=t,
                vision_config=vision, vq_config=vq, image_token_id=cfg.image_token_id,
                image_start_token_id=cfg.image_start_token_id, image_end_token_id=cfg.image_end_token_id,
                tie_word_embeddings=False)


def read_ar_config(root: str | os.PathLike) -> ARConfig:
    """ARConfig of an official folder (root holds vision_language_encoder/ and processor/)."""
    root = Path(root)
    vle = root / "vision_language_encoder"
    proc = root / "processor"
    processor = None
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (proc / name).is_file():
            processor = read_json(proc / name)
            break
    generation = read_json(vle / "generation_config.json") if (vle / "generation_config.json").is_file() else None
    extra = read_json(vle / "glimage.json") if (vle / "glimage.json").is_file() else None
    return read_config(vle / "config.json", lambda d: config_from_official(d, processor, generation, extra))


def load_ar(root: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
            cfg: ARConfig | None = None) -> GlmImageAR:
    cfg = cfg or read_ar_config(root)
    model = build_on_meta(lambda: GlmImageAR(cfg), f"{root}/vision_language_encoder/config.json")
    sd = from_official(read_state_dict(Path(root) / "vision_language_encoder", device, dtype))
    return load_strict(model, sd, what=f"{root}/vision_language_encoder").eval()


def save_ar(model: GlmImageAR, root: str | os.PathLike) -> None:
    cfg = model.cfg
    vle, proc = Path(root) / "vision_language_encoder", Path(root) / "processor"
    write_json(vle / "config.json", config_to_official(cfg))
    write_json(vle / "generation_config.json", dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                                                    top_p=cfg.top_p, eos_token_id=cfg.image_end_token_id,
                                                    pad_token_id=cfg.text.pad_token_id))
    default = ARConfig()
    extra = {k: getattr(cfg, k) for k in EXTRA_FIELDS if getattr(cfg, k) != getattr(default, k)}
    if extra:
        write_json(vle / "glimage.json", extra)
    save_state_dict(to_official(model.state_dict()), vle, "model.safetensors")
    write_json(proc / "processor_config.json", {
        "processor_class": "GlmImageProcessor",
        "image_processor": dict(image_processor_type="GlmImageImageProcessor", do_convert_rgb=True, do_resize=True,
                                do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                merge_size=1, patch_size=cfg.vision.patch_size, temporal_patch_size=1, resample=3,
                                rescale_factor=1 / 255, size=dict(shortest_edge=cfg.source_min_pixels,
                                                                  longest_edge=cfg.source_max_pixels)),
    })
