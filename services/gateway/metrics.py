"""Prometheus metrics of the gateway: latency histograms, outcomes, SLO attainment, worker load.

Each app owns a CollectorRegistry (several gateways can live in one test process). Worker load is
not copied into gauges: a collector reads the registry's latest reports at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gateway.registry import Registry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10,
                    15, 20, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class GatewayMetrics:
    def __init__(self, workers: Registry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Named as vLLM names them (TTFT, TPOT per request, inter-token latency, e2e), units in the name.
        self.ttft = Histogram("distserve_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("distserve_time_per_output_token_seconds", "a request's mean time per output token "
                              "after the first: what the TPOT objective bounds", registry=r, buckets=_TPOT_BUCKETS)
        self.itl = Histogram("distserve_inter_token_latency_seconds", "gap between a request's consecutive tokens "
                             "as the gateway receives them", registry=r, buckets=_TPOT_BUCKETS)
        self.e2e = Histogram("distserve_e2e_request_latency_seconds", "end-to-end request latency", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self.kv_transfer = Histogram("distserve_kv_transfer_seconds", "KV cache pull time per request", ["transport"],
                                     registry=r, buckets=_TPOT_BUCKETS)
        self.kv_bytes = Counter("distserve_kv_transfer_bytes", "KV cache bytes moved prefill -> decode", ["transport"],
                                registry=r)
        self.migrations = Counter("distserve_migrations", "requests continued on another worker after theirs "
                                  "died, by the phase they were in", ["role"], registry=r)
        self.scaling = Counter("distserve_scaling_actions", "workers the actuator started or drained to follow the "
                               "online planner's plans", ["role", "action"], registry=r)
        self.requests = Counter("distserve_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.slo_attained = Counter("distserve_slo_attained_requests",
                                    "requests that met both the TTFT and the TPOT objective", registry=r)
        self.prompt_tokens = Counter("distserve_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.output_tokens = Counter("distserve_output_tokens", "generated tokens", registry=r)
        self.pending = Gauge("distserve_gateway_pending_requests", "admitted requests waiting for a first token",
                             registry=r)
        self.inflight = Gauge("distserve_gateway_inflight_requests", "admitted requests not finished", registry=r)
        r.register(WorkerLoadCollector(workers))


class WorkerLoadCollector(Collector):
    """Per-instance queue lengths and KV usage from the latest load reports."""

    def __init__(self, workers: Registry) -> None:
        self.workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["instance", "role"]
        families = {
            "queued_tokens": GaugeMetricFamily("distserve_worker_queued_tokens", "prompt tokens waiting",
                                               labels=labels),
            "waiting": GaugeMetricFamily("distserve_worker_waiting_requests",
                                         "requests queued (prefill) or waiting to pull KV (decode)", labels=labels),
            "running": GaugeMetricFamily("distserve_worker_running_requests", "sequences in the decode batch",
                                         labels=labels),
            "held": GaugeMetricFamily("distserve_worker_held_requests", "prefilled requests whose KV awaits a pull",
                                      labels=labels),
            "free_blocks": GaugeMetricFamily("distserve_worker_kv_free_blocks", "free KV blocks", labels=labels),
            "total_blocks": GaugeMetricFamily("distserve_worker_kv_total_blocks", "KV blocks", labels=labels),
        }
        usage = GaugeMetricFamily("distserve_worker_kv_usage_ratio", "fraction of KV blocks in use", labels=labels)
        alive = GaugeMetricFamily("distserve_workers_alive", "live workers by role", labels=["role"])
        draining = GaugeMetricFamily("distserve_worker_draining", "1: the worker takes no new work and leaves once "
                                     "its requests are done", labels=labels)
        info = GaugeMetricFamily("distserve_worker_info", "1 per live worker: its model, engine (emulated-<gpu>: "
                                 "modelled steps, no model runs) and parallelism",
                                 labels=[*labels, "model", "engine", "tp", "pp"])
        counts: dict[str, int] = {"prefill": 0, "decode": 0, "colocated": 0}
        for inst in list(self.workers.instances.values()):
            values = [inst.instance_id, inst.role]
            load = inst.load
            for field, family in families.items():
                family.add_metric(values, getattr(load, field))
            if load.total_blocks:
                usage.add_metric(values, 1 - load.free_blocks / load.total_blocks)
            w = inst.info
            draining.add_metric(values, float(w.draining))
            info.add_metric([*values, w.model, w.engine, str(w.tp), str(w.pp)], 1)
            counts[inst.role] += 1
        for role, n in counts.items():
            alive.add_metric([role], n)
        yield from families.values()
        yield usage
        yield alive
        yield draining
        yield info
