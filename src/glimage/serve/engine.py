"""The serving engine: bounded admission, request batching, and the AR and DiT as two pipelined stages.

A request asks for n images of one prompt; each image is an independent draw (AR included) with seed S + i,
exactly as `glimage generate --seed S --num-images n` draws them. Its images travel as items through two
worker threads, as vLLM-Omni and SGLang run GLM-Image (only prior-token ids cross between the stages):

    admit -> [AR queue] -> AR worker: prompts -> prior ids, glyph embeddings       (batch k+1)
          -> [DiT queue] -> DiT worker: reference K/V, Euler loop with CFG, VAE   (batch k, at the same time)

Each worker takes the waiting item whose request has had the fewest images taken by that stage so far (the
oldest among equals: one large request cannot make a later small one wait for all of its images) and up to
max_batch - 1 more that share its shape (AR: size and source-image sizes; DiT: size, steps, CFG on/off,
glyph length, reference length), so that a batch needs no padding the item would not have alone. Every item
keeps its own generators (AR sampler and noise, seeded like the CLI's), so a request served alone gives the
CLI's image bit for bit; batched with others, what changes is measured by scripts/bench_serve.py and stated in
the README.

Admission is two steps: reserve() takes a place in the bounded queue (or refuses, 429/503) before a request's
expensive preparation (decoding an edit's sources), enqueue() then queues its images. Cancellation (a client
gone, a deadline passed) drops an item from its queue, from the running AR batch at its next token, or from
the running DiT batch at its next denoising step. drain() stops admission and lets admitted requests finish.
Events go to each request's `sink` (called from the worker threads): partial, progress, image, error, done.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..models.dit import RefKV
from ..pipeline import GlmImagePipeline, to_pil
from ..prior import Prior
from ..sampling import Interrupted
from ..validate import InputError

log = logging.getLogger("glimage.serve")


class Busy(Exception):
    """The admission queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """Loading or draining: answer 503."""


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


class NoMetrics:
    def observe(self, stage: str, seconds: float) -> None: ...
    def set_queue(self, waiting: int, in_flight: int) -> None: ...
    def image_done(self) -> None: ...


class Engine:
    def __init__(self, pipe: GlmImagePipeline, max_queue: int = 16, max_batch: int = 8, batch_wait: float = 0.01,
                 metrics=None, lanes: int = 1):
        self.pipe = pipe
        # lanes > 1 (a CPU): that many DiT workers, each single-threaded on its own core, take batches of up to
        # max_batch / lanes. The DiT is compute-bound on a CPU even at batch 1, so cores, not batch size, set
        # its throughput; and OpenMP threads of one op stall whenever another worker takes one of their cores.
        self.lanes = max(1, lanes)
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait
        self.metrics = metrics or NoMetrics()
        self.lock = threading.Condition()
        self.ar_queue: list[Item] = []
        self.dit_queue: list[Item] = []
        self.admitted: set[Request] = set()
        self.state = "ready"
        self.image_interval = None  # running estimate of the seconds between delivered images, for Retry-After
        self.last_delivery = None
        self.threads: list[threading.Thread] = []

    # -- admission

    def start(self) -> None:
        loops = [("glimage-ar", self._ar_loop)] + [(f"glimage-dit{i}", self._dit_loop) for i in range(self.lanes)]
        for name, loop in loops:
            t = threading.Thread(target=loop, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def submit(self, req: Request) -> None:
        self.reserve(req)
        self.enqueue(req)

    def reserve(self, req: Request) -> None:
        """Admit a request (a place in the bounded queue) before its expensive preparation (decoding source
        images): refused with Busy (429) or Unavailable (503) before any of that work is done."""
        with self.lock:
            if self.state != "ready":
                raise Unavailable(f"the server is {self.state}")
            if len(self.admitted) >= self.max_queue:
                raise Busy(self.retry_after())
            req.admitted_at, req.left = time.monotonic(), req.n
            self.admitted.add(req)
            self._gauges()

    def enqueue(self, req: Request) -> None:
        """Queue the images of a reserved request for the AR stage."""
        with self.lock:
            if req not in self.admitted or req.cancelled.is_set():
                return
            self.ar_queue.extend(Item(req, i, req.seed + i) for i in range(req.n))
            self._gauges()
            self.lock.notify_all()

    def retry_after(self) -> int:
        """Seconds until a place in the queue frees: until the admitted request with the fewest images left
        finishes, the stages sharing their time fairly among the admitted requests. Call with the lock held."""
        interval = self.image_interval if self.image_interval is not None else 1.0
        fewest = min((r.left for r in self.admitted), default=0)
        return max(1, min(60, math.ceil(fewest * len(self.admitted) * interval)))

    def cancel(self, req: Request, reason: str) -> None:
        """Drop a request: its items leave the queues, or the running batch at its next token or step."""
        req.cancel(reason)
        self._finish(req)

    def drain(self, timeout: float) -> bool:
        """Stop admitting; wait for the admitted requests. True if they all finished in time."""
        with self.lock:
            self.state = "draining"
            end = time.monotonic() + timeout
            while self.admitted and time.monotonic() < end:
                self.lock.wait(timeout=0.1)
            left = list(self.admitted)
        for req in left:
            self._fail(req, 503, "the server is shutting down", "shutdown")
        return not left

    def stop(self) -> None:
        with self.lock:
            self.state = "stopped"
            self.lock.notify_all()
        for t in self.threads:
            t.join(timeout=5)

    def queue_depth(self) -> tuple[int, int]:
        """(items waiting for the AR, requests admitted)."""
        with self.lock:
            return len(self.ar_queue), len(self.admitted)

    def _gauges(self) -> None:
        self.metrics.set_queue(len(self.ar_queue), len(self.admitted))

    def _finish(self, req: Request) -> None:
        with self.lock:
            if req in self.admitted:
                self.admitted.discard(req)
                self._gauges()
                self.lock.notify_all()

    def _fail(self, req: Request, status: int, message: str, reason: str, code: str | None = None) -> None:
        """End a request with an error event (unless it was already cancelled: nobody listens then)."""
        if req in self.admitted and not req.cancelled.is_set():
            req.emit({"event": "error", "status": status, "message": message, "code": code or reason})
        req.cancel(reason)
        self._finish(req)

    # -- batching

    def _take(self, queue: list[Item], key, cap: int, stage: str) -> list[Item] | None:
        """Wait for work; return the live item whose request this stage has served least (oldest first among
        equals) and up to cap - 1 more of its shape, in the same order."""
        waited = False
        with self.lock:
            while True:
                if self.state == "stopped":
                    return None
                now = time.monotonic()
                for it in [it for it in queue if it.req.cancelled.is_set() or it.req.expired(now)]:
                    queue.remove(it)
                    if not it.req.cancelled.is_set():
                        self._fail(it.req, 504, "the request's deadline passed while it waited", "timeout")
                    else:
                        self._finish(it.req)
                if not queue:
                    self.lock.wait(timeout=0.5)
                    continue
                if len(queue) < cap and self.batch_wait > 0 and not waited:
                    waited = True  # once: let a burst's other requests arrive
                    self.lock.wait(timeout=self.batch_wait)
                    continue
                order = sorted(queue, key=lambda it: it.req.taken.get(stage, 0))  # stable: FIFO among equals
                k = key(order[0])
                batch = [it for it in order if key(it) == k][:cap]
                for it in batch:
                    queue.remove(it)
                    it.req.taken[stage] = it.req.taken.get(stage, 0) + 1
                self._gauges()
                return batch

    # -- the AR stage

    def _ar_loop(self) -> None:
        torch.set_grad_enabled(False)  # per thread; and some kernels differ with grad on (SDPA on the CPU)
        while (batch := self._take(self.ar_queue, Item.ar_key, self.max_batch, "ar")) is not None:
            self._ar_batch(batch)
            batch = None  # nothing of a finished batch (its source images) stays alive while the loop waits

    def _ar_batch(self, batch: list[Item]) -> None:
        t0 = time.monotonic()
        for it in batch:
            self.metrics.observe("queue", t0 - it.req.admitted_at)
        try:
            self._run_ar(batch)
        except Interrupted:  # every request of the batch was cancelled or timed out meanwhile
            return
        except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
            self._batch_failed(batch, e)
            return
        self.metrics.observe("ar", time.monotonic() - t0)
        with self.lock:
            self.dit_queue.extend(it for it in batch if not it.req.cancelled.is_set())
            self.lock.notify_all()

    def _run_ar(self, batch: list[Item]) -> None:
        r0 = batch[0].req
        images = [it.req.images for it in batch] if r0.images else None
        prior = self.pipe.draw_priors([it.req.prompt for it in batch], r0.height, r0.width, images,
                                      [it.seed for it in batch], lambda: self._stop_ar(batch))
        for b, it in enumerate(batch):
            it.prior = prior.ids[b:b + 1]
            if images:
                it.source_ids, it.source_grids = [prior.source_ids[b]], [prior.source_grids[b]]
            # glyphs per prompt (T5 runs per prompt anyway): their length is part of the DiT's batch key
            it.glyph, it.neg = self.pipe.encode_text([it.req.prompt], it.req.guidance > 1)

    def _stop_ar(self, batch: list[Item]) -> bool:
        """Between AR tokens: fail the requests whose deadline passed; stop once no row has a listener."""
        now = time.monotonic()
        for it in batch:
            if it.req.expired(now) and not it.req.cancelled.is_set():
                self._fail(it.req, 504, "the request's deadline passed while its AR tokens were drawn", "timeout")
        return all(it.req.cancelled.is_set() for it in batch)

    # -- the DiT stage

    def _dit_loop(self) -> None:
        torch.set_grad_enabled(False)
        cap = math.ceil(self.max_batch / self.lanes)
        while (batch := self._take(self.dit_queue, Item.dit_key, cap, "dit")) is not None:
            try:
                self._run_dit(batch)
            except Exception as e:  # noqa: BLE001
                self._batch_failed(batch, e)
            batch = None

    @torch.no_grad()
    def _run_dit(self, batch: list[Item]) -> None:
        pipe, r0 = self.pipe, batch[0].req
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
                    self._fail(it.req, 504, f"the request's deadline passed at denoising step {i + 1}", "timeout")
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
        self.metrics.observe("dit", t1 - t0)
        for row, it in enumerate(live):
            if it.req.expired() and not it.req.cancelled.is_set():
                self._fail(it.req, 504, "the request's deadline passed before its image was decoded", "timeout")
            if it.req.cancelled.is_set():
                continue
            # one image at a time, as a batch of one decodes it: the same pixels, and far less memory
            image = to_pil(pipe.decode_latents(latents[row:row + 1]))[0]
            self._deliver(it, image)
        self.metrics.observe("vae", time.monotonic() - t1)

    def _deliver(self, it: Item, image: Image.Image) -> None:
        req = it.req
        req.emit({"event": "image", "index": it.index, "image": image, "seed": it.seed})
        self.metrics.image_done()
        with self.lock:
            now = time.monotonic()
            if self.last_delivery is not None:  # the stages had work since the last image: their pace
                gap = now - self.last_delivery
                self.image_interval = gap if self.image_interval is None else 0.7 * self.image_interval + 0.3 * gap
            req.left -= 1
            done = req.left == 0
            if done:
                req.images = []  # no stage reads them any more: freed now, not when the answer is collected
            self.last_delivery = now if any(r.left > 0 for r in self.admitted) else None
        if done:
            self.metrics.observe("total", time.monotonic() - req.admitted_at)
            req.emit({"event": "done"})
            self._finish(req)

    def _batch_failed(self, batch: list[Item], e: Exception) -> None:
        if isinstance(e, InputError):
            status, message, code = 400, str(e), "invalid_request"
        else:
            log.error("a batch of %d failed:\n%s", len(batch), traceback.format_exc())
            status, message, code = 500, f"internal error ({type(e).__name__}); see the server's log", "internal"
        for req in {it.req for it in batch}:
            self._fail(req, status, message, "failed", code)

