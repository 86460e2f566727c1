"""The training stages: `make_stage(cfg)` -> the Stage (see ../stage.py) that trains cfg.stage.

vae        AutoencoderKL: L1 + L2 reconstruction + KL; export sets latents_mean/std       (stages/vae.py)
tokenizer  ViT + cosine VQ codebook: VQ-VAE through an auxiliary decoder, STE, commitment,
           dead-code revival                                                              (stages/tokenizer.py)
ar         GLM-4 decoder: next-token CE over preview grid, large grid, end-of-image       (stages/ar.py)
decoder    DiT: flow matching with the inference sigma shift, prior tokens, glyphs, CFG drop (stages/decoder.py)
grpo       the AR post-trained with GRPO: group-normalised reward of its decoded images    (stages/grpo.py)
flow_grpo  the DiT post-trained with Flow-GRPO: SDE draws from one AR draw, per-step ratio (stages/flow_grpo.py)
Each export writes a complete GLM-Image folder: the base folder with the trained component replaced.
"""

from __future__ import annotations

from ...validate import InputError
from ..config import TrainConfig


def make_stage(cfg: TrainConfig, dataset=None):
    """The Stage for cfg.stage. `dataset` (optional) replaces the stage's own ImageTextDataset (tests)."""
    if cfg.stage == "vae":
        from .vae import VAEStage
        return VAEStage(cfg, dataset)
    if cfg.stage == "tokenizer":
        from .tokenizer import TokenizerStage
        return TokenizerStage(cfg, dataset)
    if cfg.stage == "ar":
        from .ar import ARStage
        return ARStage(cfg, dataset)
    if cfg.stage == "decoder":
        from .decoder import DecoderStage
        return DecoderStage(cfg, dataset)
    if cfg.stage == "grpo":
        from .grpo import GRPOStage
        return GRPOStage(cfg, dataset)
    if cfg.stage == "flow_grpo":
        from .flow_grpo import FlowGRPOStage
        return FlowGRPOStage(cfg, dataset)
    raise InputError(f"stage={cfg.stage!r} must be one of vae, tokenizer, ar, decoder, grpo, flow_grpo")
