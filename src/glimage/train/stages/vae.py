"""Stage `vae`: the KL autoencoder (`AutoencoderKL`), for presets trained from scratch.

Objective per pixel: L1 + L2 reconstruction of a posterior sample's decoding + cfg.kl_weight * KL(q(z|x) || N(0, I))
(LDM/diffusers convention: KL summed over the latent of an image; see losses.vae_loss). No GAN or perceptual
term: the decoder stage, not the VAE, is where detail is learned at these sizes.

Export replaces `vae/` of the base folder and sets `latents_mean` / `latents_std` in its config to per-channel
statistics of the trained encoder's posterior means, measured at export on the first `STAT_IMAGES` images of
the training set: the DiT then sees latents of zero mean and unit variance per channel (the pipeline's
`(z - mean) / std`), whatever scale the encoder happened to learn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ...checkpoint import load_strict, read_state_dict
from ...convert.vae import save_vae
from ...models.vae import AutoencoderKL, DiagonalGaussian
from ...validate import InputError
from ..config import TrainConfig
from ..losses import vae_loss
from ..stage import StepOutput
from .common import StageBase, empty_output, export_folder, model_config, sample_generators, save_images, seeded_init

STAT_IMAGES = 64
INIT_LOGVAR = -6.0  # posterior std e^-3 ~ 0.05 at the start of training from scratch


def color_augment(x: torch.Tensor, generators: list[torch.Generator], p: float = 1 / 3) -> torch.Tensor:
    """Per sample, with probability p: the image in grey levels, darkened by a random factor in [0.1, 1].

    Why: a palette dataset leaves the neutral axis nearly unseen (the shapes set: a white background, six
    saturated hues, and the signs' thin dark strokes), and an autoencoder trained on it decodes the rare
    neutral darks as the nearest frequent hue (black text came back orange, the grey post blue). Grey copies
    cover the axis from black to white over whole-image areas without adding hues (x in [-1, 1])."""
    out = []
    for xi, g in zip(x, generators):
        u = torch.rand(2, generator=g)
        if u[0] < p:
            luma = (0.299 * xi[0] + 0.587 * xi[1] + 0.114 * xi[2] + 1) / 2  # (H, W) in [0, 1]
            xi = (luma * (0.1 + 0.9 * float(u[1])) * 2 - 1).expand_as(xi)
        out.append(xi)
    return torch.stack(out)


class TrainableVAE(AutoencoderKL):
    """AutoencoderKL with one forward for training: FSDP2 gathers a module's parameters around `forward`
    only, so encode and decode run inside it. Same state dict as AutoencoderKL."""

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, logvar = self.encode(x)
        # clones: the halves of the encoder output are views, and FSDP2 hooks outputs for backward
        posterior = DiagonalGaussian(mean.clone(), logvar.clone())
        return self.decode(posterior.sample(generator)), posterior


class VAEStage(StageBase):
    name = "vae"

    def __init__(self, cfg: TrainConfig, dataset=None):
        if cfg.lora_rank:
            raise InputError(f"lora_rank={cfg.lora_rank}: LoRA is supported for the ar and decoder stages only")
        self.cfg = cfg
        self.model_cfg, self.base_cfg = model_config(cfg, ("vae.",))
        self._dataset = dataset
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype  # nothing frozen

    def build(self) -> nn.Module:
        if self.cfg.freeze_encoder and self.model_cfg.vae != self.base_cfg.vae:
            raise InputError("freeze_encoder=true needs the base's VAE architecture (model overrides change it)")
        if self.cfg.base and self.model_cfg.vae == self.base_cfg.vae:
            folder = Path(self.cfg.base) / "vae"
            with torch.device("meta"):
                model = TrainableVAE(self.model_cfg.vae)
            model = load_strict(model, read_state_dict(folder), what=f"VAE checkpoint {folder}").train()
            if self.cfg.freeze_encoder:
                # Decoder-only fine-tuning (as Stable Diffusion's ft-MSE VAE): latents are unchanged, so a DiT
                # trained on the base's latents decodes with the result.
                model.encoder.requires_grad_(False)
            return model
        model = seeded_init(lambda: TrainableVAE(self.model_cfg.vae), self.cfg.seed)
        with torch.no_grad():
            # From scratch the posterior starts at std ~1, which drowns the young encoder's signal: the decoder
            # learns to ignore the latent (grey-brown blobs for every colour). Start it narrow instead; the KL
            # term widens it as far as reconstruction allows.
            C = self.model_cfg.vae.latent_channels
            model.encoder.conv_out.weight[C:] *= 0.1
            model.encoder.conv_out.bias[C:] = INIT_LOGVAR
        return model.train()

    def blocks(self, model: AutoencoderKL) -> list[nn.Module]:
        return [*model.encoder.down_blocks, model.encoder.mid_block, model.decoder.mid_block, *model.decoder.up_blocks]


    def step(self, model: AutoencoderKL, batch, generator: torch.Generator) -> StepOutput:
        if batch["images"] is None:
            return empty_output(model)
        x = batch["images"].to(self.device, self.dtype)
        gens = sample_generators(batch, generator, x.shape[0])  # per-sample noise (and augmentation)
        if self.cfg.color_aug:
            x = color_augment(x, gens)
        recon, posterior = model(x, gens)
        loss, count, metrics = vae_loss(x, recon, posterior, self.cfg.kl_weight)
        return StepOutput(loss, count, metrics)

    @torch.no_grad()
    def latent_stats(self, model: AutoencoderKL, n: int = STAT_IMAGES, batch: int = 16):
        """Per-channel mean and std of the posterior means over the first n training images."""
        ds = self.dataset()
        p = next(model.parameters())
        zs, i = [], 0
        while sum(z.shape[0] for z in zs) < n and i < len(ds):
            b = self.collate([ds[j] for j in range(i, min(i + batch, len(ds)))])
            i += batch
            if b["images"] is not None:
                zs.append(model.encode(b["images"].to(p.device, p.dtype)).mean.float())
        if not zs:
            raise InputError("cannot measure latent statistics: no readable training image")
        z = torch.cat([z.transpose(0, 1).flatten(1) for z in zs], dim=1)  # (C, N*h*w)
        # a channel the encoder never uses would get std 0 and blow up (z - mean) / std: floor it
        return z.mean(1).tolist(), z.std(1).clamp(min=1e-3).tolist()

    def export(self, model: AutoencoderKL, out_dir: str) -> None:
        model = model.eval()
        if self.cfg.freeze_encoder:  # same encoder: keep the statistics the DiT was trained with
            mean, std = self.base_cfg.vae.latents_mean, self.base_cfg.vae.latents_std
        else:
            mean, std = self.latent_stats(model)
        vae_cfg = dataclasses.replace(model.cfg, latents_mean=tuple(mean), latents_std=tuple(std))
        with torch.device("meta"):  # same weights, new statistics (save_vae writes model.cfg)
            out = AutoencoderKL(vae_cfg)
        out.load_state_dict(model.state_dict(), assign=True)
        export_folder(self.cfg, self.model_cfg, out_dir, ("vae",), lambda root: save_vae(out, root / "vae"))

    @torch.no_grad()
    def samples(self, model: AutoencoderKL, out_dir: str, step: int, n: int = 4) -> list[Path]:
        """Originals (top row) over reconstructions of the posterior mean (bottom row)."""
        from ...pipeline import to_pil
        ds = self.dataset()
        b = self.collate([ds[i] for i in range(min(n, len(ds)))])
        if b["images"] is None:
            return []
        p = next(model.parameters())
        x = b["images"].to(p.device, p.dtype)
        rec = model.eval().decode(model.encode(x).mean)
        return save_images(to_pil(torch.cat([torch.cat(list(x), -1), torch.cat(list(rec), -1)], -2)[None]),
                           out_dir, step, b["texts"])
