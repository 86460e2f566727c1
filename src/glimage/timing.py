"""Stage timings for `glimage bench`: `with timer("dit"): ...` adds the block's seconds to timer.times["dit"],
synchronising the device around it so that queued accelerator work is counted where it runs. The default,
NO_TIMER, does nothing (no synchronisation: the normal path keeps its asynchrony)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from .device import synchronize


class Timer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.times[name] += time.perf_counter() - t0


class _NoTimer:
    def __call__(self, name: str):
        return contextlib.nullcontext()


NO_TIMER = _NoTimer()
