"""Stage `flow_grpo`: the DiT post-trained with Flow-GRPO (Liu et al. 2025), the decoder half of decoupled RL.

For each caption of a batch the base folder's AR, frozen, draws one set of prior tokens; the current DiT then
draws `group_size` images from them that differ only in the diffusion noise: `reward_steps` steps of the SDE
sampler (glimage.flow.sde_step, `noise_level`; fewer steps than at inference, as Flow-GRPO trains) with the
folder's CFG, each step a Gaussian policy N(mean(x_k), std_k^2) over x_{k+1}. The VAE decodes the last
latents and the reward scores the images (glimage.train.rewards; the decoder's rewards are the detail ones:
`ocr`, `shapes_partial`, a reward server). The loss per image and denoising step is GRPO's
    max(-A r_k, -A clip(r_k, 1 - clip_range, 1 + clip_range)) + kl_coef * KL(N(mean_k) || N(mean_ref_k))
with A the reward normalised within the group, r_k = pi(x_{k+1} | x_k) / pi_old and the KL to the starting DiT,
frozen (both Gaussians have the step's std, so the KL is |mean - mean_ref|^2 / 2 std^2).

The trajectory is drawn with gradients on: each step's mean keeps its graph and the next state is detached
(a policy gradient treats the states as given), so the draw and the loss share one forward per step instead of
Flow-GRPO's second pass. Hence one update per draw, pi_old = pi and r = 1 in value: the clip would act only on
reused draws, which this version does not make (clip_frac is 0). The memory is that of group_size * reward_steps forward passes: split
captions over ranks and `grad_accum`, or train LoRA adapters (`lora_rank`) at the official widths.

Full weights or LoRA, the glyph encoder frozen or trained (`train_glyph`), the export and the samples are the
decoder stage's. Randomness per caption from its own seed (its place in the global batch): the AR's draw, the
group's initial noise and every SDE step, so 2 ranks equal one process and a resumed run redraws exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...flow import cfg_combine, gaussian_logprob, get_schedule, sde_step
from ...glyph_text import encode_glyphs
from ...pipeline import to_pil
from ...validate import InputError
from ..losses import clipped_policy_loss, gaussian_kl
from ..stage import StepOutput
from .common import empty_output, random_pipeline, sample_generators
from .decoder import DecoderStage
from .rl import RLStage


@dataclass
class Rollout:
    images: list  # G PIL images
    logp: torch.Tensor  # (G, K) log-probability of each step taken, with its graph (zeros at noise_level 0)
    kl: torch.Tensor | None  # (G, K) KL of each step to the reference DiT's, with its graph; None without one
    prior: torch.Tensor  # (G, N) the prior ids all G were drawn from
    latents: torch.Tensor  # (G, C, h, w) the final latents (fp32)


class FlowGRPOStage(RLStage, DecoderStage):
    name = "flow_grpo"
    always_reference = False  # a second DiT's forward per step: only for a KL term

    def setup(self, device, dtype) -> None:
        from ...pipeline import GlmImagePipeline
        self.device, self.dtype = torch.device(device), dtype
        pipe = (GlmImagePipeline.from_pretrained(self.cfg.base, device=device, dtype=dtype) if self.cfg.base
                else random_pipeline(self.model_cfg, self.cfg.seed, device, dtype))
        pipe.dit = nn.Identity()  # the policy is the trained model; the pipeline keeps the AR, glyphs and VAE
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.vae, self.glyph = pipe, pipe.vae, pipe.glyph_encoder
        self.vae.eval().requires_grad_(False)
        self.glyph.eval().requires_grad_(False)
        self.guidance = float(pipe.defaults.get("guidance_scale", self.cfg.sample_guidance))

    def glyph_inputs(self, model: nn.Module, texts: list[str]) -> tuple:
        """(conditional, unconditional) glyph inputs of the G images: embeddings of the prompts and of "" from
        the frozen encoder, computed once per rollout; or the strings, for a model that owns (trains) its encoder
        and so must encode them inside each forward."""
        blank = [""] * len(texts)
        if hasattr(model, "glyph_encoder"):
            return texts, blank
        with torch.no_grad():
            return (encode_glyphs(self.glyph, texts, self.device, self.dtype),
                    encode_glyphs(self.glyph, blank, self.device, self.dtype))

    def velocity(self, model: nn.Module, x: torch.Tensor, glyphs: tuple, prior: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """The DiT's velocity for latents x (G, C, h, w) as the pipeline's denoise computes it, CFG included:
        the conditional branch (prior tokens kept, the prompts' glyphs) and the unconditional one (all prior
        tokens dropped, the glyphs of ""); glyphs from glyph_inputs."""
        G = x.shape[0]
        size = self.cfg.image_size
        hw = torch.tensor([[size, size]], device=self.device, dtype=self.dtype).repeat(G, 1)
        crop = torch.zeros(G, 2, device=self.device, dtype=self.dtype)
        keep = torch.zeros_like(prior, dtype=torch.bool)
        x = x.to(self.dtype)
        v = model(x, glyphs[0], prior, keep, t, hw, crop).float()
        if self.guidance > 1:
            v = cfg_combine(model(x, glyphs[1], prior, ~keep, t, hw, crop).float(), v, self.guidance)
        return v

    def rollout(self, model: nn.Module, text: str, generator: torch.Generator) -> Rollout:
        """One caption's group: the frozen AR's prior tokens, then group_size SDE trajectories of the policy."""
        G, K, size, a = self.cfg.group_size, self.cfg.reward_steps, self.cfg.image_size, self.cfg.noise_level
        ar_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.no_grad():
            prior = self.pipe.draw_priors([text], size, size, None, [ar_seed]).ids.to(self.device).repeat(G, 1)
        ds = self.vae.cfg.downsample
        C, h, w = self.model_cfg.dit.in_channels, size // ds, size // ds
        timesteps, sigmas = get_schedule(K, size, size, self.model_cfg.scheduler, ds, self.model_cfg.dit.patch_size)
        x = torch.randn(G, C, h, w, generator=generator).to(self.device)
        glyphs = self.glyph_inputs(model, [text] * G)
        logps, kls = [], []
        for k in range(K):
            t = timesteps[k].to(self.device, self.dtype).expand(G)
            v = self.velocity(model, x, glyphs, prior, t)
            noise = torch.randn(G, C, h, w, generator=generator).to(self.device)
            x_next, mean, std = sde_step(x, v, sigmas[k], sigmas[k + 1], a, sigmas[1], noise)
            x_next = x_next.detach()
            logps.append(gaussian_logprob(x_next, mean, std) if a > 0 else torch.zeros(G, device=self.device))
            if self.has_reference:
                with torch.no_grad(), self.reference(model) as ref:
                    v_ref = self.velocity(ref, x, glyphs, prior, t)
                    mean_ref = sde_step(x, v_ref, sigmas[k], sigmas[k + 1], a, sigmas[1])[1]
                kls.append(gaussian_kl(mean, mean_ref, std))
            x = x_next
        with torch.no_grad():
            images = to_pil(self.pipe.decode_latents(x).float())
        return Rollout(images, torch.stack(logps, 1), torch.stack(kls, 1) if kls else None, prior, x)

    def step(self, model: nn.Module, batch, generator: torch.Generator) -> StepOutput:
        if not batch["texts"]:
            return empty_output(model)
        if self.cfg.noise_level <= 0:
            raise InputError("noise_level=0 makes every draw of a group the same image (the ODE): Flow-GRPO "
                             "needs noise_level > 0")
        G = self.cfg.group_size
        gens = sample_generators(batch, generator, len(batch["texts"]))
        rolls = [self.rollout(model, text, g) for text, g in zip(batch["texts"], gens)]
        images = [im for r in rolls for im in r.images]
        texts = [t for t in batch["texts"] for _ in range(G)]
        rewards, adv = self.score(images, texts, [r for r in batch["records"] for _ in range(G)])
        logp = torch.cat([r.logp for r in rolls])  # (B*G, K)
        loss, count, clipped = clipped_policy_loss(logp, logp.detach(), adv, self.cfg.clip_range)
        K = logp.shape[1]
        spread = rewards.view(-1, G).std(dim=1, unbiased=False).sum() * G
        # metric sums normalised by count (images * steps) in the logs: mean reward, group spread, clip share
        metrics = {"reward": rewards.sum().to(count) * K, "group_std": spread.to(count) * K, "clip_frac": clipped,
                   "logp": logp.detach().sum()}
        if self.has_reference:
            kl = torch.cat([r.kl for r in rolls])
            loss = loss + self.cfg.kl_coef * kl.sum()
            metrics["kl"] = kl.detach().sum()
        return StepOutput(loss, count, metrics)
