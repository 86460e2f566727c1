"""The pieces every training loop shares (glimage.train.loop, glimage.mindspore.train and the RL stages through
them): the learning-rate schedule, seeds, EMA warm-up, the DataLoader's batch sampler and collation that
drop unusable samples, and the export and sample writers. Nothing here knows a model or a framework's
distributed API."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..validate import InputError
from .config import TrainConfig


def lr_at(i: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step i (0-based): linear warmup to cfg.lr, cosine down to cfg.min_lr."""
    if i < cfg.warmup:
        return cfg.lr * (i + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (i - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple: stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RobustDataset(Dataset):
    """Returns (sample or None, the skip reasons the dataset counted while loading it): a worker process's
    counter never reaches the main process otherwise."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def _get(self, i):
        before = Counter(getattr(self.ds, "skipped", None) or {})
        sample = self.ds[i]
        delta = Counter(getattr(self.ds, "skipped", None) or {}) - before
        if sample is None and not delta:
            delta["unusable"] = 1
        return sample, delta

    def __getitem__(self, i):
        return (i, *self._get(i))

    def first_usable(self, i):
        n = len(self.ds)
        for k in range(n):
            sample, _ = self._get((i + k) % n)
            if sample is not None:
                return sample
        raise RuntimeError(f"no usable sample in the dataset ({n} samples, all skipped)")


class SkippingCollate:
    """Drops unusable samples (the loss normalisation by the global count keeps a smaller batch exact).
    A micro-batch with no usable sample at all still runs forward and backward, on a stand-in sample with
    weight 0: FSDP2's collectives need every rank in every forward and backward."""

    def __init__(self, stage, data: RobustDataset):
        self.stage, self.data = stage, data

    def __call__(self, items):
        skipped = Counter()
        for _, _, s in items:
            skipped.update(s)
        samples = [x for _, x, _ in items if x is not None]
        positions = [j for j, (_, x, _) in enumerate(items) if x is not None]  # places in the micro-batch
        real = bool(samples)
        if not real:
            samples, positions = [self.data.first_usable(items[0][0])], [0]
        return self.stage.collate(samples), skipped, real, positions


class MicroBatches:
    """Index lists of this rank's micro-batches, step after step from `start`: the DataLoader's batch sampler."""

    def __init__(self, plan, cfg: TrainConfig, start: int, rank: int, world: int):
        self.plan, self.cfg, self.start, self.rank = plan, cfg, start, rank
        self.b = cfg.batch_size // world
        self.m = self.b // cfg.grad_accum

    def __iter__(self):
        for i in range(self.start, self.cfg.steps):
            idx = [int(j) for j in self.plan.indices(i)]
            if len(idx) != self.cfg.batch_size:
                raise InputError(f"plan.indices({i}) gave {len(idx)} indices; batch_size={self.cfg.batch_size}")
            mine = idx[self.rank * self.b:(self.rank + 1) * self.b]
            for a in range(self.cfg.grad_accum):
                yield mine[a * self.m:(a + 1) * self.m]


def ema_decay(decay: float, step: int) -> float:
    """EMA decay at optimizer step `step` (1-based), warmed up as diffusers' EMAModel: (1 + t) / (10 + t) caps it
    early on, so a short run's export is not still weighted towards the random init (0.999^2000 = 13.5%)."""
    return min(decay, (1 + step) / (10 + step))


def write_samples(stage, fresh: nn.Module, out: Path, step: int, device: torch.device) -> None:
    fn = getattr(stage, "samples", None)
    if fn is None:
        return
    with torch.no_grad():
        fn(fresh.to(device), str(out / "samples"), step)


def export_run(stage, fresh: nn.Module, out: Path) -> Path:
    """Write into a temporary folder, then rename: `<out>/export` is complete whenever it exists."""
    final, tmp = out / "export", out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stage.export(fresh, str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final
