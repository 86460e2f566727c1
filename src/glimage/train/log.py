"""Run logging on rank 0: `<out>/metrics.jsonl` (one line per optimizer step), TensorBoard, a progress bar.

On resume the JSONL file is cut back to the steps the checkpoint contains (steps logged after it were lost
with the kill and are redone), so the file always holds each step exactly once, in order. A line cut short
by a kill is dropped the same way. Other ranks get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .ckpt import write_atomic


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)  # JSON has no inf/nan


class RunLog:
    def __init__(self, out: str | os.PathLike, enabled: bool, start_step: int, total_steps: int,
                 tensorboard: bool = True, log_every: int = 1):
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.path = Path(out) / "metrics.jsonl"
        self.tb = self.bar = self.file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            try:  # optional dependency (pip install glimage[train])
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out) / "tb"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= start_step:
                keep.append(line)
        write_atomic(self.path, "".join(f"{line}\n" for line in keep))

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        # flushed each step: a SIGKILL loses at most the line being written (dropped on resume)
        self.file.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        step = record["step"]
        if self.tb is not None and step % self.log_every == 0:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)
        self.bar.update(1)
        if step % self.log_every == 0:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}",
                                 gnorm=f"{record['grad_norm']:.3g}", refresh=False)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()
