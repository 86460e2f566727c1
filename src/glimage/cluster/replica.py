"""What a Ray replica or actor loads: its half of the model, with its threads pinned."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """How every replica loads the model: the same arguments as `glimage serve`/`generate` take."""
    model: str | None = None  # folder, random:PRESET, or None = the shipped model
    device: str | None = None
    dtype: str | None = None
    threads: int = 1  # torch threads per replica (Ray's num_cpus is bookkeeping: this is what runs)
    fast: dict = field(default_factory=dict)  # step_cache, ar_int8

    def load(self, part: str):
        """The pipeline with only `part` ("ar" or "dit") loaded (a random preset: whole, it is small)."""
        import torch

        from ..pipeline import open_model

        torch.set_num_threads(max(1, int(self.threads)))
        torch.set_grad_enabled(False)
        pipe = open_model(self.model, self.device, self.dtype, parts=(part,))
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_fast(**self.fast)
        return pipe
