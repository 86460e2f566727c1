"""Distributed checkpoints (torch.distributed.checkpoint) that resume exactly and are never half-written.

Layout under `<out>/ckpt/`:
    step_000040/        a complete checkpoint: DCP shards + .metadata (model, optimizer, EMA) and meta.json
    latest              text file naming the newest complete checkpoint ("step_000040")
    .tmp-step_000050/   a save in progress (or one interrupted by a kill): ignored, removed at the next start

A save writes every rank's shards into the temporary directory (files fsynced by DCP), then rank 0 writes
meta.json, renames the directory to its final name and replaces `latest` by rename. Each of those is atomic
on POSIX, so a kill at any moment leaves the previous `latest` pointing at a complete checkpoint. If `latest`
is missing or names a directory that does not exist, the newest complete `step_*` directory is used.

The model and optimizer state dicts come from `torch.distributed.checkpoint.state_dict` (sharded DTensors
under FSDP2), so a checkpoint can be loaded by a different number of ranks: DCP reshards on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import dist as D

_NAME = re.compile(r"^step_(\d+)$")
FAULT_ENV = "GLIMAGE_TRAIN_FAULT"  # test hook: "POINT:STEP", see fault()


def fault(point: str, step: int) -> None:
    """Fault injection for the crash tests: SIGKILL this process at `point` of step `step`.

    Points: `mid_save` (shards written, checkpoint not yet renamed into place), `before_latest` (renamed,
    pointer not yet updated), `after_step` (step finished, including its checkpoint if any).
    """
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpointer:
    def __init__(self, root: str | os.PathLike, d: D.Dist, keep: int = 2):
        self.root = Path(root)
        self.d = d
        self.keep = keep  # <= 0 keeps every checkpoint

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:06d}"

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.match(p.name)) and (p / "meta.json").is_file()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, broadcast so every rank loads the same one)."""
        path = None
        if self.d.is_main:
            for tmp in self.root.glob(".tmp-*") if self.root.is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
            pointer = self.root / "latest"
            if pointer.is_file():
                cand = self.root / pointer.read_text().strip()
                if _NAME.match(cand.name) and (cand / "meta.json").is_file():
                    path = str(cand)
            if path is None and (done := self._complete()):
                path = str(done[-1])
        path = D.broadcast_object(path)
        return Path(path) if path else None

    def save(self, step: int, state: dict, meta: dict) -> Path:
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier(self.d)
        # collective: returns on every rank once all shards and rank 0's .metadata are written (and fsynced)
        dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True))
        fault("mid_save", step)
        if self.d.is_main:
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # a save whose `latest` update was lost to a kill: not the resume point
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            fault("before_latest", step)
            write_atomic(self.root / "latest", final.name + "\n")
            self._prune(final)
        D.barrier(self.d)
        return final

    def _prune(self, current: Path) -> None:
        if self.keep <= 0:
            return
        done = self._complete()
        for old in done[:-self.keep]:
            if old != current:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, state: dict) -> dict:
        """Fill `state` (same structure as saved) in place from `path`; returns its meta.json."""
        dcp.load(state, checkpoint_id=str(path))
        return json.loads((path / "meta.json").read_text())


def train_state(model, optimizer, ema: dict | None) -> dict:
    """The state DCP saves/loads: sharded model + optimizer state dicts (+ the EMA, sharded like the params)."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if ema:
        state["ema"] = ema
    return state


def apply_train_state(model, optimizer, state: dict) -> None:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
