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


CURVES = ("reward", "kl", "entropy", "clip_frac", "tail_mass", "group_std", "loss", "grad_norm")


def plot_curves(out: str | os.PathLike, keys: tuple[str, ...] = CURVES, smooth: int = 10) -> Path | None:
    """`<out>/curves.png`: one panel per key of metrics.jsonl present in the run (the RL stages: reward, KL,
    entropy, clip fraction...), each step's value and its running mean over `smooth` steps. None when
    matplotlib (pip install glimage[train]) is missing or nothing is logged."""
    path = Path(out) / "metrics.jsonl"
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                   for r in rows)]
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        steps, vals = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(steps, vals, lw=0.8, alpha=0.4, color="C0")
        mean = [sum(vals[max(0, i - smooth + 1): i + 1]) / len(vals[max(0, i - smooth + 1): i + 1])
                for i in range(len(vals))]
        ax.plot(steps, mean, lw=1.6, color="C0")
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(Path(out).name, fontsize=10)
    fig.tight_layout()
    target = Path(out) / "curves.png"
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target
