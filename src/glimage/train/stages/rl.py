"""What the RL stages (grpo, flow_grpo) share: their prompts, the reward and its advantages, and the frozen
reference policy the KL term is measured against. A mixin placed before the stage whose model it post-trains:
`class GRPOStage(RLStage, ARStage)`."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...validate import InputError
from ..config import TrainConfig
from ..lora import adapters_off
from ..losses import group_advantages
from ..rewards import Reward, resolve_reward, score_images


def eval_texts() -> set[str]:
    """Every prompt of the shapes evaluation sets (seeds 0-9, 50 per category): RL never trains on them."""
    from ...data.shapes import eval_prompts
    return {p["prompt"] for seed in range(10) for p in eval_prompts(seed=seed, n_per_category=50)}


class PromptRecords(torch.utils.data.Dataset):
    """The records of a data folder's metadata.jsonl (what the reward checks the images against), without the
    captions that are evaluation prompts (`dropped` counts them)."""

    def __init__(self, root: str | Path):
        path = Path(root) / "metadata.jsonl"
        if not path.is_file():
            raise InputError(f"data={str(root)!r}: the RL stages read the captions and their specs from "
                             f"metadata.jsonl (a `glimage data shapes` folder); {path} not found")
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        held = eval_texts()
        self.records = [r for r in records if r["text"] not in held]
        self.dropped = len(records) - len(self.records)
        if not self.records:
            raise InputError(f"data={str(root)!r}: every caption in {path} is an evaluation prompt")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"record": self.records[i], "text": self.records[i]["text"], "index": i}


def prompt_records(cfg: TrainConfig) -> PromptRecords:
    """The RL stages' data: the records of cfg.data, or of a shapes set generated into the run folder."""
    from ..data import prepare_data
    return PromptRecords(prepare_data(cfg))


def collate_records(samples: list[dict | None]) -> dict[str, Any]:
    samples = [s for s in samples if s is not None]
    return {"records": [s["record"] for s in samples], "texts": [s["text"] for s in samples],
            "index": [s["index"] for s in samples]}


class RLStage:
    always_reference = True  # keep the starting model as the reference policy even at kl_coef = 0 (for its KL)

    def __init__(self, cfg: TrainConfig, dataset=None, reward: Reward | None = None):
        super().__init__(cfg, dataset)
        self.reward = resolve_reward(reward or cfg.reward, cfg.reward_timeout)
        self.pipe = self.ref = None

    def build(self) -> nn.Module:
        model = super().build()
        # the starting model, frozen; a LoRA run's is the trained model with its adapters off (no second copy)
        if self.ref is None and not self.cfg.lora_rank and (self.cfg.kl_coef or self.always_reference):
            self.ref = copy.deepcopy(model).requires_grad_(False).eval()
        return model

    @property
    def has_reference(self) -> bool:
        return self.ref is not None or (bool(self.cfg.lora_rank) and bool(self.cfg.kl_coef or self.always_reference))

    @contextmanager
    def reference(self, model: nn.Module):
        """The reference policy to run under no_grad: the frozen copy, or `model` with its LoRA adapters off."""
        if self.ref is not None:
            yield self.ref.to(self.device)
        else:
            with adapters_off(model) as base:
                yield base

    def dataset(self):
        if self._dataset is None:
            self._dataset = prompt_records(self.cfg)
        return self._dataset

    def collate(self, samples: list[dict | None]) -> dict[str, Any]:
        return collate_records(samples)

    def score(self, images: list, texts: list[str], records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards (N,), advantages (N,)) of N = captions x group_size images, each caption's group contiguous."""
        G = self.cfg.group_size
        rewards = score_images(self.reward, images, texts, records)
        adv = group_advantages(rewards.view(-1, G), scale=self.cfg.adv_scale).flatten()
        return rewards, adv.clamp(min=0) if self.cfg.positive_only else adv
