"""Prometheus metrics of one server (its own registry, so that several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("glimage_queue_depth", "images waiting for the AR stage", registry=r)
        self.in_flight = Gauge("glimage_requests_in_flight", "requests admitted and not finished", registry=r)
        self.latency = Histogram("glimage_stage_seconds", "seconds per stage: queue (admission to AR start, per "
                                 "image), ar and dit (per batch), vae (per batch, all its images), total (per request)",
                                 ["stage"], buckets=BUCKETS, registry=r)
        self.images = Counter("glimage_images", "images delivered", registry=r)
        self.requests = Counter("glimage_requests", "requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.rejections = Counter("glimage_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.replica_failures = Counter("glimage_replica_failures", "calls to a stage's replica that died (Ray: the "
                                        "image is drawn again on another)", ["stage"], registry=r)

    # the engine's hooks
    def observe(self, stage: str, seconds: float) -> None:
        self.latency.labels(stage).observe(seconds)

    def set_queue(self, waiting: int, in_flight: int) -> None:
        self.queue.set(waiting)
        self.in_flight.set(in_flight)

    def image_done(self) -> None:
        self.images.inc()

    def replica_failed(self, stage: str) -> None:
        self.replica_failures.labels(stage).inc()

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
