"""A worker's own Prometheus endpoint: engine steps, batch sizes, queue time and KV usage, per instance.

The gateway exports the cluster's view from load reports (services/gateway/metrics.py); this is the
worker's own, scraped from each worker (`worker.metrics_port`; compose and Kubernetes turn it on).
Names follow vLLM's where they mean the same (queue time, KV cache usage, running/waiting requests).
Queue lengths and KV usage are read from the runner's latest stats at scrape time, not copied into gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.engine.api import EngineStats, StepRecord

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_BATCH_REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_PHASES = {"prefill": ("prefill",), "decode": ("decode",), "colocated": ("prefill", "decode", "mixed")}


class WorkerMetrics:
    def __init__(self, instance_id: str, role: str, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"instance": instance_id, "role": role}
        self._step = Histogram("distserve_step_duration_seconds", "one engine step (schedule, forward, sample), "
                               "by what it computed: prefill, decode or mixed", ["instance", "role", "phase"],
                               registry=r, buckets=_STEP_BUCKETS)
        self._tokens = Histogram("distserve_step_batch_tokens", "tokens computed in one engine step",
                                 ["instance", "role"], registry=r, buckets=_BATCH_TOKEN_BUCKETS).labels(**labels)
        self._requests = Histogram("distserve_step_batch_requests", "sequences in one engine step",
                                   ["instance", "role"], registry=r, buckets=_BATCH_REQUEST_BUCKETS).labels(**labels)
        self._queue = Histogram("distserve_request_queue_time_seconds", "a request's wait on this worker, from "
                                "its arrival to the start of the step that prefilled it", ["instance", "role"],
                                registry=r, buckets=_QUEUE_BUCKETS).labels(**labels)
        self._labels = labels
        for phase in _PHASES[role]:  # exported from the start (at 0), so every worker's series exist
            self._step.labels(phase=phase, **labels)
        r.register(_EngineStatsCollector(labels, stats))

    def observe_steps(self, records: list[StepRecord]) -> None:
        for rec in records:
            phase = ("mixed" if rec.decode_batch else "prefill") if rec.prefill_lengths else "decode"
            self._step.labels(phase=phase, **self._labels).observe(rec.seconds)
            self._tokens.observe(sum(rec.prefill_lengths) + rec.decode_batch)
            self._requests.observe(len(rec.prefill_lengths) + rec.decode_batch)

    def observe_queue_time(self, seconds: float) -> None:
        self._queue.observe(max(0.0, seconds))

    def serve(self, host: str, port: int) -> None:
        """The /metrics endpoint, on a daemon thread of prometheus_client's."""
        start_http_server(port, addr=host, registry=self.registry)


class _EngineStatsCollector(Collector):
    def __init__(self, labels: dict[str, str], stats: Callable[[], EngineStats | None]) -> None:
        self.labels = labels
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:  # the engine is still loading
            return
        names, values = list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("distserve_num_requests_running", "sequences in the running batch", s.num_running),
            ("distserve_num_requests_waiting", "requests queued for prefill", s.num_waiting),
            ("distserve_num_requests_held", "prefilled requests whose KV awaits a pull", s.num_held),
            ("distserve_kv_cache_usage_ratio", "fraction of KV blocks in use",
             1 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0),
        ):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
