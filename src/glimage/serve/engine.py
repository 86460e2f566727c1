"""The serving engine: bounded admission, request batching, and the AR and DiT as two pipelined stages.

A request asks for n images of one prompt (stages.Request); its images travel as items through two worker
threads, as vLLM-Omni and SGLang run GLM-Image (only prior-token ids cross between the stages; what each stage
computes is in stages.py, and glimage.cluster.RayEngine runs the same stages in Ray deployments):

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

import torch
from PIL import Image

from ..pipeline import GlmImagePipeline
from ..sampling import Interrupted
from ..validate import InputError
from . import stages
from .stages import Item, Request  # noqa: F401 - the app's names for them

log = logging.getLogger("glimage.serve")


class Busy(Exception):
    """The admission queue is full: answer 429 with Retry-After."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Unavailable(Exception):
    """Loading or draining: answer 503."""


class NoMetrics:
    def observe(self, stage: str, seconds: float) -> None: ...
    def set_queue(self, waiting: int, in_flight: int) -> None: ...
    def image_done(self) -> None: ...
    def replica_failed(self, stage: str) -> None: ...


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
        self.ar_lanes = 1  # AR worker threads
        self.dit_cap = math.ceil(max_batch / self.lanes)  # images per DiT batch
        self.ar_key, self.dit_key = Item.ar_key, Item.dit_key  # what items must share to be batched
        self.image_interval = None  # running estimate of the seconds between delivered images, for Retry-After
        self.last_delivery = None
        self.threads: list[threading.Thread] = []

    # -- admission

    def start(self) -> None:
        loops = [(f"glimage-ar{i}", self._ar_loop) for i in range(self.ar_lanes)] + \
            [(f"glimage-dit{i}", self._dit_loop) for i in range(self.lanes)]
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

    def health(self) -> dict:
        """What /health adds about the stages; "status": "degraded" when some stage runs below strength."""
        return {"device": str(self.pipe.device), "dit_lanes": self.lanes}

    def _gauges(self) -> None:
        self.metrics.set_queue(len(self.ar_queue), len(self.admitted))

    def _finish(self, req: Request) -> None:
        with self.lock:
            if req in self.admitted:
                self.admitted.discard(req)
                self._gauges()
                self.lock.notify_all()

    def _fail(self, req: Request, status: int, message: str, reason: str, code: str | None = None,
              retry_after: int | None = None) -> None:
        """End a request with an error event (unless it was already cancelled: nobody listens then)."""
        if req in self.admitted and not req.cancelled.is_set():
            req.emit({"event": "error", "status": status, "message": message, "code": code or reason,
                      "retry_after": retry_after})
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
        while (batch := self._take(self.ar_queue, self.ar_key, self.max_batch, "ar")) is not None:
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
        stages.draw_priors(self.pipe, batch, lambda: self._stop_ar(batch))
        stages.encode_glyphs(self.pipe, batch)

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
        while (batch := self._take(self.dit_queue, self.dit_key, self.dit_cap, "dit")) is not None:
            try:
                self._run_dit(batch)
            except Exception as e:  # noqa: BLE001
                self._batch_failed(batch, e)
            batch = None

    def _run_dit(self, batch: list[Item]) -> None:
        stages.denoise(self.pipe, batch, self._fail, self._deliver, self.metrics.observe)

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

