"""Stage `grpo`: the AR generator post-trained with GRPO against a reward on the decoded image.

GLM-Image's post-training is decoupled GRPO: the AR is rewarded for what the image shows (semantics, layout),
the decoder for its details (stage flow_grpo). For each caption of a batch the current AR draws `group_size`
token grids with its own sampling settings (generation_config.json), the frozen decoder side of the base folder
(glyph encoder + DiT + VAE, `reward_steps` Euler steps at the folder's CFG) draws each into an image, and the
reward scores it (glimage.train.rewards: `shapes`, `shapes_partial`, `ocr`, weighted sums, a user's function
or a reward server). Advantages are the rewards normalised within each group (losses.group_advantages;
`adv_scale = false` keeps the reward's scale). The loss per drawn token is GRPO's:
    max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)) + kl_coef * KL_k3(pi || pi_ref),   r = pi / pi_old
with log pi taken under the distribution the sampler draws from (temperature, top-k / top-p nucleus
renormalised: losses.sampling_logprobs) and pi_ref the base AR, frozen. One update per draw, so pi_old = pi
and r = 1 in value: the clip would act only on reused draws, which this version does not make (clip_frac is 0).

Why the first version collapsed (lr 3e-4: mean reward 0.40 -> 0.03 in 30 steps): its log p was the plain
softmax's. Pushing a bad draw's probability down under the full softmax moves mass anywhere, also into the
tail the nucleus (top_p 0.75) never samples, where no later draw can take it back; the nucleus' own ids all
lose mass together and sampling degrades. `nucleus_logp = false` reproduces it; docs/rl.md has the curves.
`positive_only` keeps only the draws above their group's mean (the first version's stable fallback).

Data: the records of a shapes data folder (metadata.jsonl: caption, template, objects, position, word); the
images are not read, and captions that are evaluation prompts are dropped (rl.PromptRecords). The trained module
(language model + head), its export and its samples are the ar stage's; `batch_size` counts captions, so one
step scores batch_size * group_size images.
"""

from __future__ import annotations

import torch
from torch import nn

from ...device import manual_generator
from ...prior import upsample_ids
from ...prompt import build_prompts
from ...sampling import generate_grid_tokens
from ..losses import clipped_policy_loss, kl_k3, sampling_logprobs, token_logprobs
from ..stage import StepOutput
from .ar import ARModel, ARStage, ar_batch
from .common import empty_output, random_pipeline, sample_generators
from .rl import RLStage


class _Sampler:
    """The trained ARModel behind the interface of GlmImageAR that sampling.generate_grid_tokens calls; it
    calls the root module, so FSDP2's hooks gather its shards as in a training forward."""

    def __init__(self, model: ARModel):
        self.model, self.cfg, self.lm_head = model, model.cfg, model.lm_head
        self.device = model.lm_head.weight.device

    def new_cache(self, batch: int, max_len: int):
        return self.model.new_cache(batch, max_len)

    def __call__(self, input_ids, position_ids, mask, cache, pos, last_only=True):
        return self.model(input_ids, position_ids, mask, input_ids.shape[1] - 1, cache, pos)


class GRPOStage(RLStage, ARStage):
    name = "grpo"
    always_reference = True  # a small AR: its KL is logged even at kl_coef = 0

    def setup(self, device, dtype) -> None:
        super().setup(device, dtype)
        from ...pipeline import GlmImagePipeline
        pipe = (GlmImagePipeline.from_pretrained(self.cfg.base, device=device, dtype=dtype) if self.cfg.base
                else random_pipeline(self.model_cfg, self.cfg.seed, device, dtype))
        # the decoder side only: prior ids come from the policy, so the base's language model is dropped
        pipe.ar.language_model, pipe.ar.lm_head = nn.Identity(), nn.Identity()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe


    @torch.no_grad()
    def draw(self, model: ARModel, texts: list[str], generator: torch.Generator):
        """Sample one token sequence per text with the policy, and decode each into an image.
        -> (tokens (N, n_grid) in generation order, the PromptBatch, PIL images)."""
        size, cfg = self.cfg.image_size, self.ar_cfg
        prompts = build_prompts(texts, size, size, self.tok, cfg)
        tokens = generate_grid_tokens(_Sampler(model), prompts, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                      progress=False)
        th, tw = prompts.large_grid
        large = tokens[:, prompts.large_offset: prompts.large_offset + th * tw]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        images = self.pipe(texts, height=size, width=size, num_inference_steps=self.cfg.reward_steps,
                           prior_token_ids=upsample_ids(large, th, tw), seed=seed).images
        return tokens, prompts, images

    def token_logprobs(self, model: ARModel, texts: list[str], tokens: torch.Tensor, prompts):
        """(log p (N, n), entropy (N, n), tail mass (N, n)) of the drawn tokens, teacher-forced exactly as the ar
        stage feeds targets; log p under the sampler's nucleus (nucleus_logp) or the plain softmax."""
        size, cfg = self.cfg.image_size, self.ar_cfg
        grids, o = [], 0
        for h, w in prompts.grids:
            grids.append(tokens[:, o:o + h * w].reshape(-1, h, w).cpu())
            o += h * w
        b = ar_batch(texts, size, size, self.tok, cfg, grids)
        mask = b.mask.to(self.device) if b.mask is not None else None
        n = tokens.shape[1]  # the end-of-image target is not sampled: no term for it
        logits = model(b.input_ids.to(self.device), b.position_ids.to(self.device), mask, b.start)[:, :n]
        tokens = tokens.to(self.device)
        logp, entropy, tail = sampling_logprobs(logits, tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                                cfg.vq.num_embeddings)
        if not self.cfg.nucleus_logp:  # the plain softmax's log p and entropy; the tail mass is the same
            logp, entropy = token_logprobs(logits, tokens, cfg.temperature)
        return logp, entropy, tail

    def policy_loss(self, model: ARModel, texts: list[str], tokens: torch.Tensor, prompts,
                    advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(sum, count, metric sums) of GRPO's per-token loss over the drawn tokens (on-policy: pi_old = pi)."""
        logp, entropy, tail = self.token_logprobs(model, texts, tokens, prompts)
        loss, count, clipped = clipped_policy_loss(logp, logp.detach(), advantages, self.cfg.clip_range)
        metrics = {"entropy": entropy.detach().sum(), "tail_mass": tail.sum(), "clip_frac": clipped}
        if self.has_reference:
            with torch.no_grad(), self.reference(model) as ref:
                ref_logp = self.token_logprobs(ref, texts, tokens, prompts)[0]
            kl = kl_k3(logp, ref_logp)
            if self.cfg.kl_coef:
                loss = loss + self.cfg.kl_coef * kl.sum()
            metrics["kl"] = kl.detach().sum()
        return loss, count, metrics

    def step(self, model: ARModel, batch, generator: torch.Generator) -> StepOutput:
        if not batch["texts"]:
            return empty_output(model)
        G = self.cfg.group_size
        texts = [t for t in batch["texts"] for _ in range(G)]  # each caption's group is contiguous
        # each group from its caption's own seed (its place in the global batch): the same draws for any split
        # of the batch over ranks and accumulation steps
        gens = [manual_generator(self.device, g.initial_seed())
                for g in sample_generators(batch, generator, len(batch["texts"]))]
        draws = [self.draw(model, [t] * G, g) for t, g in zip(batch["texts"], gens)]
        tokens, prompts = torch.cat([d[0] for d in draws]), draws[0][1]
        images = [im for d in draws for im in d[2]]
        rewards, adv = self.score(images, texts, [r for r in batch["records"] for _ in range(G)])
        loss, count, metrics = self.policy_loss(model, texts, tokens, prompts, adv)
        # metrics are normalised by count (N * n tokens): these sums log the mean reward and its spread per group
        n = tokens.shape[1]
        spread = rewards.view(-1, G).std(dim=1, unbiased=False).sum() * G
        metrics.update({"reward": rewards.sum().to(count) * n, "group_std": spread.to(count) * n})
        return StepOutput(loss, count, metrics)
