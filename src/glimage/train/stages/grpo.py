"""Stage `grpo`: the AR generator post-trained with GRPO against a reward on the decoded image.

GLM-Image's post-training is decoupled GRPO: the AR is rewarded for what the image shows (semantics, OCR), the
decoder for its details. This stage is the AR half with a programmatic reward. For each caption of a batch the
current AR draws `group_size` token grids (with its own sampling settings: generation_config.json), the frozen
decoder side of the base folder (glyph encoder + DiT + VAE, `reward_steps` Euler steps at the folder's CFG)
draws each into an image, and the reward scores it -- `shapes`: 1 when glimage.eval.shapes.check finds exactly
the caption's objects, position or relation, or word, else 0. The advantages are the rewards normalised within
each group (losses.group_advantages) and the loss is -A log p of the sampled tokens
(losses.policy_gradient_loss): on-policy, one update per draw, so PPO's clipped ratio is 1. There is no KL term
to a reference model (DAPO drops it as well); a small lr and few steps keep the policy near its start.
`positive_only` keeps only the draws above their group's mean. The negative terms are unbounded below: on the
shapes model the plain objective collapsed the policy (lr 3e-4: mean reward 0.40 -> 0.03 in 30 steps), most
likely by pushing probability into the tail that top-k/top-p sampling never draws; with the better draws alone
(each term bounded, log p <= 0; lr 1e-4, 100 steps) it stayed stable.

Data: the records of a shapes data folder (metadata.jsonl: caption, template, objects, position, word); the
images are not read. The trained module (language model + head), its export and its samples are the ar
stage's; `batch_size` counts captions, so one step scores batch_size * group_size images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...device import manual_generator
from ...prior import upsample_ids
from ...prompt import build_prompts
from ...sampling import generate_grid_tokens
from ...validate import InputError
from ..config import TrainConfig
from ..losses import group_advantages, policy_gradient_loss
from ..stage import StepOutput
from .ar import ARModel, ARStage, ar_batch
from .common import empty_output, random_pipeline, sample_generators

Reward = Callable[[list, list[dict]], list[float]]


def shapes_reward(images: list, records: list[dict]) -> list[float]:
    """1.0 for an image the shapes checker passes for its record, else 0.0 (the evaluation's own criterion)."""
    from ...eval.shapes import check
    return [float(check(image, rec)[0]) for image, rec in zip(images, records)]


REWARDS: dict[str, Reward] = {"shapes": shapes_reward}


class PromptRecords(torch.utils.data.Dataset):
    """The records of a data folder's metadata.jsonl (what the reward checks the images against)."""

    def __init__(self, root: str | Path):
        path = Path(root) / "metadata.jsonl"
        if not path.is_file():
            raise InputError(f"data={str(root)!r}: the grpo stage reads the captions and their specs from "
                             f"metadata.jsonl (a `glimage data shapes` folder); {path} not found")
        with open(path) as f:
            self.records = [json.loads(line) for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"record": self.records[i], "text": self.records[i]["text"], "index": i}


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


class GRPOStage(ARStage):
    name = "grpo"

    def __init__(self, cfg: TrainConfig, dataset=None, reward: Reward | None = None):
        super().__init__(cfg, dataset)
        if reward is None and cfg.reward not in REWARDS:
            raise InputError(f"reward={cfg.reward!r} must be one of {sorted(REWARDS)}")
        self.reward = reward or REWARDS[cfg.reward]
        self.pipe = None

    def setup(self, device, dtype) -> None:
        super().setup(device, dtype)
        from ...pipeline import GlmImagePipeline
        pipe = (GlmImagePipeline.from_pretrained(self.cfg.base, device=device, dtype=dtype) if self.cfg.base
                else random_pipeline(self.model_cfg, self.cfg.seed, device, dtype))
        # the decoder side only: prior ids come from the policy, so the base's language model is dropped
        pipe.ar.language_model, pipe.ar.lm_head = nn.Identity(), nn.Identity()
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def dataset(self):
        if self._dataset is None:
            from ..data import prepare_data
            self._dataset = PromptRecords(prepare_data(self.cfg))
        return self._dataset

    def collate(self, samples: list[dict | None]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        return {"records": [s["record"] for s in samples], "texts": [s["text"] for s in samples],
                "index": [s["index"] for s in samples]}

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

    def policy_loss(self, model: ARModel, texts: list[str], tokens: torch.Tensor, prompts,
                    advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, count) of -A log p over the drawn tokens, teacher-forced exactly as the ar stage feeds targets."""
        size = self.cfg.image_size
        grids, o = [], 0
        for h, w in prompts.grids:
            grids.append(tokens[:, o:o + h * w].reshape(-1, h, w).cpu())
            o += h * w
        b = ar_batch(texts, size, size, self.tok, self.ar_cfg, grids)
        mask = b.mask.to(self.device) if b.mask is not None else None
        logits = model(b.input_ids.to(self.device), b.position_ids.to(self.device), mask, b.start)
        n = tokens.shape[1]  # the end-of-image target is not sampled: no term for it
        return policy_gradient_loss(logits[:, :n], tokens.to(self.device), advantages, self.ar_cfg.temperature)

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
        rewards = torch.tensor(self.reward(images, [r for r in batch["records"] for _ in range(G)]))
        adv = group_advantages(rewards.view(-1, G)).flatten()
        if self.cfg.positive_only:
            adv = adv.clamp(min=0)
        loss, count = self.policy_loss(model, texts, tokens, prompts, adv)
        # metrics are normalised by count (N * n tokens): these sums log the mean reward and its spread per group
        n = tokens.shape[1]
        spread = rewards.view(-1, G).std(dim=1, unbiased=False).sum() * G
        return StepOutput(loss, count, {"reward": rewards.sum().to(count) * n, "group_std": spread.to(count) * n})
