"""The two stages of a served image, as functions over a batch of items: the AR (prompt -> prior ids) and the
DiT (prior ids -> image). The one-process engine (engine.py) runs them in its worker threads; the Ray deployments
(glimage.cluster) run the same functions in their replicas, so a request gives the same image either way.

A request asks for n images of one prompt; image i is an independent draw (AR included) with seed S + i,
exactly as `glimage generate --seed S --num-images n` draws them.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from ..models.dit import RefKV
from ..pipeline import GlmImagePipeline, to_pil
from ..prior import Prior


@dataclass(eq=False)
class Request:
    prompt: str
    height: int
    width: int
    steps: int
    guidance: float
    seed: int
    n: int = 1
    images: list = field(default_factory=list)  # source images (PIL) for an edit
    partial_images: int = 0
    progress: bool = False
    deadline: float = math.inf  # time.monotonic() by which it must finish
    sink: object = None  # callable(event: dict), thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""  # why it was cancelled: "disconnected", "timeout", "shutdown", "failed"
    admitted_at: float = 0.0
    left: int = 0  # images not yet delivered
    taken: dict = field(default_factory=dict)  # stage -> images of this request that stage has taken

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    def emit(self, event: dict) -> None:
        if self.sink is not None:
            self.sink(event)

    def partial_steps(self) -> dict[int, int]:
        """Step index -> partial image index: partial_images previews spread evenly over the steps."""
        k = self.partial_images
        steps = {max(0, (j + 1) * self.steps // (k + 1) - 1): j for j in range(k)}
        return {s: i for i, s in enumerate(sorted(steps))}  # fewer when the steps are too few to spread them


@dataclass(eq=False)
class Item:
    """One image of a request."""
    req: Request
    index: int
    seed: int
    prior: torch.Tensor | None = None  # (1, N) ids, one per DiT patch
    source_ids: list | None = None
    source_grids: list | None = None
    glyph: torch.Tensor | None = None  # (1, T, D)
    neg: torch.Tensor | None = None

    def ar_key(self):
        return self.req.height, self.req.width, tuple(im.size for im in self.req.images)

    def dit_key(self):
        r = self.req
        refs = tuple(self.source_grids) if self.source_grids else ()
        return r.height, r.width, r.steps, r.guidance > 1, self.glyph.shape[1], refs


def draw_priors(pipe: GlmImagePipeline, batch: list[Item], should_stop=None) -> None:
    """The AR stage for a batch of one shape (Item.ar_key): each row from its own generator, as the CLI draws
    it. should_stop() is asked between tokens: True ends the batch (sampling.Interrupted)."""
    r0 = batch[0].req
    images = [it.req.images for it in batch] if r0.images else None
    prior = pipe.draw_priors([it.req.prompt for it in batch], r0.height, r0.width, images, [it.seed for it in batch],
                             should_stop)
    for b, it in enumerate(batch):
        it.prior = prior.ids[b:b + 1]
        if images:
            it.source_ids, it.source_grids = [prior.source_ids[b]], [prior.source_grids[b]]


def encode_glyphs(pipe: GlmImagePipeline, batch: list[Item]) -> None:
    """Glyph embeddings per prompt (T5 runs per prompt anyway): their length is part of the DiT's batch key."""
    for it in batch:
        it.glyph, it.neg = pipe.encode_text([it.req.prompt], it.req.guidance > 1)


@torch.no_grad()
def denoise(pipe: GlmImagePipeline, batch: list[Item], fail, deliver, observe=lambda stage, seconds: None) -> None:
    """The DiT stage for a batch of one shape (Item.dit_key): reference K/V of an edit's sources, the Euler loop
    with CFG (each row's noise from its own generator, seeded like the CLI's), the VAE one image at a time.
    fail(req, status, message, reason) ends a request (a deadline passed); deliver(item, image) hands over a
    finished image; the requests' sinks get progress and partial events. Rows whose request is cancelled leave
    the batch at the next step."""
    r0 = batch[0].req
    t0 = time.monotonic()
    kv = None
    if r0.images:
        kv = RefKV.stack([pipe._reference_kv([it.req.images], Prior(it.prior, None, None, it.source_ids,
                                                                    it.source_grids), 1) for it in batch])
    # each image's noise from its own generator, seeded like the CLI's
    latents = torch.cat([torch.randn((1, *pipe.latent_shape(r0.height, r0.width)), dtype=pipe.dtype,
                                     generator=torch.Generator().manual_seed(it.seed)) for it in batch])
    cfg = r0.guidance > 1
    scales = [it.req.guidance for it in batch]
    guidance = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float32)
    live = list(batch)  # the items still in the batch, in row order
    partials = {id(it): it.req.partial_steps() for it in batch}

    def on_step(i, sigma, sigma_next, x, v):
        nonlocal live
        now = time.monotonic()
        keep = []
        for row, it in enumerate(live):
            if it.req.expired(now) and not it.req.cancelled.is_set():
                fail(it.req, 504, f"the request's deadline passed at denoising step {i + 1}", "timeout")
            if not it.req.cancelled.is_set():
                keep.append(row)
        for row in keep:
            it = live[row]
            if it.req.progress:
                it.req.emit({"event": "progress", "index": it.index, "step": i + 1, "steps": it.req.steps})
            if i in partials[id(it)] and i + 1 < it.req.steps:
                image = pipe.preview(x[row:row + 1], v[row:row + 1], sigma_next)[0]
                it.req.emit({"event": "partial", "index": it.index, "partial_index": partials[id(it)][i],
                             "image": image})
        if len(keep) == len(live):
            return None
        live = [live[row] for row in keep]
        return {"rows": keep}

    glyph = torch.cat([it.glyph for it in batch])
    neg = torch.cat([it.neg for it in batch]) if cfg else None
    prior = torch.cat([it.prior for it in batch])
    latents = pipe.denoise(latents, glyph, neg, prior, r0.height, r0.width, r0.steps, guidance, kv, on_step)
    t1 = time.monotonic()
    observe("dit", t1 - t0)
    for row, it in enumerate(live):
        if it.req.expired() and not it.req.cancelled.is_set():
            fail(it.req, 504, "the request's deadline passed before its image was decoded", "timeout")
        if it.req.cancelled.is_set():
            continue
        # one image at a time, as a batch of one decodes it: the same pixels, and far less memory
        image = to_pil(pipe.decode_latents(latents[row:row + 1]))[0]
        deliver(it, image)
    observe("vae", time.monotonic() - t1)
