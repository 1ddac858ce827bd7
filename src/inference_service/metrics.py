"""Prometheus metrics of one service instance, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """Every metric the service exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.results = Counter(
            "inference_results", "Results published, by status (ok or error code).", ["status"],
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "inference_dead_letters", "Task copies sent to the dead-letter topic, by error code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "inference_stage_seconds", "Latency per stage of a task (fetch, decode, ...).",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "inference_in_flight", "Tasks consumed and not yet published.", registry=r
        )
        self.in_flight_bytes = Gauge(
            "inference_in_flight_bytes", "Task record bytes held in flight.", registry=r
        )
        self.consumer_lag = Gauge(
            "inference_consumer_lag", "Records behind the end of each assigned partition.",
            ["topic", "partition"], registry=r,
        )  # fmt: skip
        self.assigned_partitions = Gauge(
            "inference_assigned_partitions", "Tasks-topic partitions assigned to this replica.",
            registry=r,
        )  # fmt: skip
        self.rebalances = Counter(
            "inference_rebalances", "Partition assignment changes, by kind.", ["kind"], registry=r
        )
        self.transactions = Counter(
            "inference_commits", "Commits of results and offsets, by outcome.", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.redelivered = Counter(
            "inference_redelivered_records", "Records the Kafka client delivered a second time "
            "(skipped: their first delivery is processed).", registry=r,
        )  # fmt: skip
        self.paused = Gauge(
            "inference_consumption_paused", "1 while consumption is paused (back-pressure or "
            "a dependency down).", registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "inference_batch_size", "Frames per inference call.",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )  # fmt: skip
        self.detector_in_flight = Gauge(
            "inference_detector_in_flight", "Frames at detector workers, not yet answered.",
            registry=r,
        )  # fmt: skip
        self.detector_pending = Gauge(
            "inference_detector_pending", "Frames waiting for a detector worker with room.",
            registry=r,
        )  # fmt: skip
        self.worker_restarts = Counter(
            "inference_worker_restarts", "Detector worker processes replaced after dying.",
            registry=r,
        )  # fmt: skip
        self.http_pending = Gauge(
            "inference_http_pending", "POST /v1/detect requests being read, waiting or detected "
            "(at most INFERENCE_HTTP_MAX_PENDING).", registry=r,
        )  # fmt: skip
        self.http_rejected = Counter(
            "inference_http_rejected", "POST /v1/detect requests refused, by reason (busy, "
            "not_ready, too_large, unauthorized).", ["reason"], registry=r,
        )  # fmt: skip

        self.model_info = Gauge(
            "inference_model_info", "The serving model (value 1): its name, sha256 (the one "
            "results carry), runtime and precision.", ["name", "sha256", "runtime", "precision"],
            registry=r,
        )  # fmt: skip
        self._model_shown: tuple[str, str, str, str] | None = None
        self.model_load_seconds = Gauge(
            "inference_model_load_seconds", "Seconds the serving model took to load and warm "
            "in every worker.", registry=r,
        )  # fmt: skip
        self.model_swaps = Counter(
            "inference_model_swaps", "Model swaps asked for, by outcome (swapped, unchanged, "
            "failed, busy, refused).", ["outcome"], registry=r,
        )  # fmt: skip

    def show_model(self, name: str, sha256: str, runtime: str, precision: str) -> None:
        """Make ``inference_model_info`` name only this model."""
        labels = (name, sha256, runtime, precision)
        if self._model_shown not in (None, labels):
            self.model_info.remove(*self._model_shown)
        self.model_info.labels(*labels).set(1)
        self._model_shown = labels

    def observe_timings(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def render(self, before: Callable[[], None] | None = None) -> bytes:
        """The text exposition; ``before`` refreshes pulled values first."""
        if before is not None:
            before()
        return generate_latest(self.registry)
