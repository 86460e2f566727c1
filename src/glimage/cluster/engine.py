"""The ingress' engine on Ray: glimage.serve.Engine (bounded admission, 429/503, fairness between requests,
deadlines, cancellation, delivery) whose two stages are calls to the AR and DiT deployments.

The AR worker threads send each image of a batch as its own call; the AR deployment's serve.batch groups the
calls of every ingress replica by shape. Each DiT worker thread streams one image from the DiT pool (progress,
partial images, the image). More DiT workers than replicas run, so that Ray's router holds the surplus: its
queue is what Serve's autoscaler scales the pool by.

A replica that dies mid-call (a crash, `ray.kill`, a lost node) fails only that call: the image is drawn again
on another replica (its seed fixes it, so the answer is the same image; partial images already streamed are not
sent twice), up to `retries` times, then the request is answered 503 with Retry-After. A watcher cancels the
calls of requests that were cancelled (client gone) or ran out of time, on whatever replica or queue they are.
"""

from __future__ import annotations

import logging
import threading
import time

from ..serve.engine import Engine
from ..serve.stages import Item

log = logging.getLogger("glimage.serve")
DEGRADED_S = 30.0  # a replica failure seen this recently makes /health say "degraded"
SERVING = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # Serve's deployment states at full strength


def _unavailable_errors() -> tuple:
    """The exceptions that mean "the replica (or its node) went away", not "the request was bad"."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError, rex.WorkerCrashedError,
            sex.DeploymentUnavailableError, sex.ReplicaUnavailableError, sex.BackPressureError)


DOWN = {"down": True}  # _call's result for an item no live replica answered


class RayEngine(Engine):
    def __init__(self, ar, dit, max_queue: int = 16, max_batch: int = 8, batch_wait: float = 0.01, metrics=None,
                 ar_lanes: int = 2, dit_lanes: int | None = None, retries: int = 2):
        dit_lanes = dit_lanes or max_queue
        super().__init__(None, max_queue, max_batch, batch_wait, metrics, dit_lanes)
        self.ar, self.dit, self.retries = ar, dit, retries
        self.ar_lanes, self.dit_cap = ar_lanes, 1
        self.dit_key = lambda it: 0  # one image per call: any two items may follow each other
        self.calls: dict[int, tuple] = {}  # id -> (response, items) in flight, for the watcher
        self.last_failure = -DEGRADED_S
        self.status_cache = (0.0, None)
        self.unavailable = _unavailable_errors()

    def start(self) -> None:
        super().start()
        t = threading.Thread(target=self._watch, name="glimage-watch", daemon=True)
        t.start()
        self.threads.append(t)

    # -- the stages, remote

    def _run_ar(self, batch: list[Item]) -> None:
        results = self._call(batch, lambda it: self.ar.draw.remote(_ar_job(it)), "AR")
        for it, res in zip(batch, results):
            if res is None:
                continue
            if res is DOWN:  # only the requests whose images found no live AR replica
                self._down([it], "AR")
            elif "error" in res:
                status, message = res["error"]
                self._fail(it.req, status, message, "failed", "invalid_request" if status == 400 else "internal")
            else:
                it.prior, it.source_ids, it.source_grids = res["prior"], res["source_ids"], res["source_grids"]
        # the DiT stage takes only the items the AR answered
        batch[:] = [it for it, res in zip(batch, results)
                    if res is not None and res is not DOWN and "error" not in res]

    def _call(self, batch: list[Item], send, stage: str) -> list:
        """send(item) for every item, retried where a replica died; a result per item (None: cancelled; DOWN:
        no live replica after every try)."""
        results = [None] * len(batch)
        todo = [i for i, it in enumerate(batch) if not it.req.cancelled.is_set()]
        for attempt in range(self.retries + 1):
            calls = {i: send(batch[i]) for i in todo}
            keys = [self._track(response, [batch[i]]) for i, response in calls.items()]
            failed = []
            try:
                for i, response in calls.items():
                    try:
                        results[i] = response.result()
                    except self.unavailable as e:
                        self._replica_failed(stage, e)
                        failed.append(i)
                    except Exception:  # noqa: BLE001 - a cancelled call, or a bug on the replica
                        if not batch[i].req.cancelled.is_set():
                            raise
            finally:
                for key in keys:
                    self.calls.pop(key, None)
            if not failed:
                return results
            todo = [i for i in failed if not batch[i].req.cancelled.is_set()]
            time.sleep(0.5 * (attempt + 1))  # the controller notices the dead replica meanwhile
        for i in todo:
            results[i] = DOWN
        return results

    def _run_dit(self, batch: list[Item]) -> None:
        it = batch[0]
        job = {**_ar_job(it), "index": it.index, "prior": it.prior, "source_ids": it.source_ids,
               "source_grids": it.source_grids, "partial_images": it.req.partial_images, "progress": it.req.progress}
        sent = set()  # partial images already streamed: a retry does not send them again
        for attempt in range(self.retries + 1):
            job["seconds_left"] = it.req.deadline - time.monotonic()
            stream = self.dit.options(stream=True).remote(job)
            key = self._track(stream, [it])
            try:
                for ev in stream:
                    kind = ev["event"]
                    if kind == "image":
                        self._deliver(it, ev["image"])
                        return
                    if kind == "error":
                        self._fail(it.req, ev["status"], ev["message"], "failed", ev.get("code"))
                        return
                    if kind == "partial":
                        if ev["partial_index"] in sent:
                            continue
                        sent.add(ev["partial_index"])
                    it.req.emit(ev)
                return  # the stream ended without an image: the request was cancelled
            except self.unavailable as e:
                self._replica_failed("DiT", e)
            except Exception:  # noqa: BLE001
                if it.req.cancelled.is_set():
                    return
                raise
            finally:
                self.calls.pop(key, None)
            if it.req.cancelled.is_set():
                return
            time.sleep(0.5 * (attempt + 1))
        self._down([it], "DiT")

    def _down(self, batch: list[Item], stage: str) -> None:
        """A stage's calls failed on every try: 503 with Retry-After."""
        message = f"the {stage} stage failed {self.retries + 1} times (replicas lost); retry shortly"
        for req in {it.req for it in batch}:
            self._fail(req, 503, message, "failed", "unavailable", retry_after=5)

    def _replica_failed(self, stage: str, e: Exception) -> None:
        self.last_failure = time.monotonic()
        self.metrics.replica_failed(stage.lower())
        log.warning("a %s replica failed (%s); drawing the image again on another", stage, type(e).__name__)

    # -- cancellation

    def _track(self, response, items: list[Item]) -> int:
        key = id(response)
        self.calls[key] = (response, items)
        return key

    def _watch(self) -> None:
        """Cancel calls whose requests are all cancelled, or past their deadline (504)."""
        while self.state != "stopped":
            time.sleep(0.2)
            now = time.monotonic()
            for response, items in list(self.calls.values()):
                for it in items:
                    if it.req.expired(now) and not it.req.cancelled.is_set():
                        self._fail(it.req, 504, "the request's deadline passed while its image was drawn", "timeout")
                if all(it.req.cancelled.is_set() for it in items):
                    response.cancel()

    # -- health

    def health(self) -> dict:
        """The deployments' replicas as Serve's controller sees them; "degraded" while a stage is unhealthy or
        being replaced, or a replica failed in the last 30 s; "unavailable" (503) when a stage has no replica."""
        t, cached = self.status_cache
        if cached is not None and time.monotonic() - t < 1.0:
            return cached
        from ray import serve

        stages, status = {}, "ready"
        try:
            app = serve.status().applications[serve.get_replica_context().app_name]
            for name, d in app.deployments.items():
                running = d.replica_states.get("RUNNING", 0)
                stages[name] = {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                                "replicas": dict(d.replica_states)}
                if running == 0:
                    status = "unavailable"
                elif stages[name]["status"] not in SERVING and status == "ready":
                    status = "degraded"
        except Exception as e:  # noqa: BLE001 - the controller itself is unreachable
            stages, status = {"error": f"{type(e).__name__}: {e}"}, "degraded"
        if status == "ready" and time.monotonic() - self.last_failure < DEGRADED_S:
            status = "degraded"
        body = {"status": status, "stages": stages, "dit_workers": self.lanes}
        self.status_cache = (time.monotonic(), body)
        return body


def _ar_job(it: Item) -> dict:
    """What crosses to the AR deployment for one image: the request's parameters and sources, no tensors."""
    r = it.req
    return {"prompt": r.prompt, "height": r.height, "width": r.width, "steps": r.steps, "guidance": r.guidance,
            "seed": it.seed, "images": r.images}
