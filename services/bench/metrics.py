"""Per-request latencies, SLO attainment, run summaries and the goodput search: pure functions.

Definitions (DistServe, OSDI 2024):
  - TTFT: send -> first non-empty token chunk.
  - TPOT: (e2e - TTFT) / (output tokens - 1): the mean gap between later tokens. A request with one
    output token has no TPOT and is judged on TTFT alone.
  - A request attains the SLO when it succeeded, TTFT <= ttft_s and TPOT <= tpot_s. Attainment is
    over every scheduled request: failed, timed-out and never-sent requests count as misses.
  - Goodput: the highest swept rate whose attainment >= the target (a measured point, never an
    extrapolation). ``interpolated_goodput`` also estimates where attainment crosses the target
    between that rate and the next swept one, linearly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from shared.workloads import SLO


@dataclass(frozen=True)
class RequestRecord:
    """One request of one run. Times are seconds since the run started (one monotonic clock)."""

    index: int
    rate: float  # the run's request rate (inf: all at once)
    scheduled_s: float  # when the schedule said to send it
    input_tokens: int  # from the workload (the raw prompt, before any chat template)
    expected_output_tokens: int  # max_tokens asked for
    sent_s: float | None = None  # when the request was actually sent (None: never sent)
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0  # from the server's usage report, else the number of content chunks
    prompt_tokens: int | None = None  # the server's own count (includes any chat template)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and self.first_token_s is not None

    @property
    def ttft(self) -> float | None:
        return self._since_sent(self.first_token_s)

    @property
    def e2e(self) -> float | None:
        return self._since_sent(self.end_s)

    def _since_sent(self, t: float | None) -> float | None:
        return t - self.sent_s if self.ok and t is not None and self.sent_s is not None else None

    @property
    def tpot(self) -> float | None:
        ttft, e2e = self.ttft, self.e2e
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def send_lag(self) -> float | None:
        """How late the client sent it: a loaded client would silently lower the offered rate."""
        return None if self.sent_s is None else self.sent_s - self.scheduled_s

    def row(self) -> dict[str, object]:
        """Flat dict for JSON and CSV: the stored fields plus the derived latencies."""
        derived = {"ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e, "send_lag": self.send_lag}
        return {**asdict(self), **derived}


def meets_ttft(record: RequestRecord, slo: SLO) -> bool:
    ttft = record.ttft
    return ttft is not None and ttft <= slo.ttft_s


def meets_tpot(record: RequestRecord, slo: SLO) -> bool:
    tpot = record.tpot
    return record.ok and (tpot is None or tpot <= slo.tpot_s)


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    return meets_ttft(record, slo) and meets_tpot(record, slo)


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Fraction of all records (failures included) that meet both SLOs."""
    if not records:
        raise ValueError("attainment of an empty run")
    return sum(meets_slo(r, slo) for r in records) / len(records)


def attainment_vs_scale(records: Sequence[RequestRecord], slo: SLO, scales: Sequence[float]) -> list[float]:
    """Attainment with both SLO bounds multiplied by each scale (the paper's second view)."""
    return [attainment(records, slo.scaled(s)) for s in scales]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default); None for no values."""
    return float(np.percentile(values, q)) if values else None


@dataclass(frozen=True)
class RunSummary:
    rate: float
    num_requests: int
    completed: int
    errors: int
    duration_s: float  # first send -> last response end
    throughput_rps: float  # completed requests per second
    output_tokens_per_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p90: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    e2e_p99: float | None
    max_send_lag_s: float | None
    attainment: float
    ttft_attainment: float
    tpot_attainment: float


def summarize(records: Sequence[RequestRecord], slo: SLO) -> RunSummary:
    """Summary of one run (all records share one rate)."""
    if not records:
        raise ValueError("summary of an empty run")
    rates = {r.rate for r in records}
    if len(rates) != 1:
        raise ValueError(f"records from several runs (rates {sorted(rates)}): summarize each run alone")
    done = [r for r in records if r.ok]
    ttfts = [t for r in done if (t := r.ttft) is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    e2es = [t for r in done if (t := r.e2e) is not None]
    sent = [r.sent_s for r in records if r.sent_s is not None]
    ends = [r.end_s for r in done if r.end_s is not None]
    duration = max(ends) - min(sent) if ends and sent else 0.0
    lags = [lag for r in records if (lag := r.send_lag) is not None]
    n = len(records)
    return RunSummary(
        rate=rates.pop(),
        num_requests=n,
        completed=len(done),
        errors=n - len(done),
        duration_s=duration,
        throughput_rps=len(done) / duration if duration > 0 else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in done) / duration if duration > 0 else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p90=percentile(tpots, 90),
        tpot_p99=percentile(tpots, 99),
        e2e_p50=percentile(e2es, 50),
        e2e_p99=percentile(e2es, 99),
        max_send_lag_s=max(lags) if lags else None,
        attainment=attainment(records, slo),
        ttft_attainment=sum(meets_ttft(r, slo) for r in records) / n,
        tpot_attainment=sum(meets_tpot(r, slo) for r in records) / n,
    )


# ---- goodput ---------------------------------------------------------------------------------------

Point = tuple[float, float]  # (rate, attainment)


def goodput(points: Sequence[Point], target: float) -> float | None:
    """The highest swept rate whose attainment >= target; None if no rate meets it."""
    passing = [rate for rate, att in points if att >= target]
    return max(passing) if passing else None


def interpolated_goodput(points: Sequence[Point], target: float) -> float | None:
    """Where attainment crosses the target between the goodput rate and the next higher swept rate.

    Linear in rate between those two measured points; equals ``goodput`` when no higher rate was
    swept (no extrapolation) and is None when no rate meets the target.
    """
    best = goodput(points, target)
    if best is None:
        return None
    above = sorted((rate, att) for rate, att in points if rate > best and math.isfinite(rate))
    if not above:
        return best
    best_att = max(att for rate, att in points if rate == best)
    rate_hi, att_hi = above[0]  # fails the target, since best is the highest passing rate
    return best + (best_att - target) / (best_att - att_hi) * (rate_hi - best)


def next_probe_rate(points: Sequence[Point], target: float, *, growth: float = 2.0) -> float:
    """The next rate to measure when searching for goodput.

    Bisects (geometric mean) between the highest passing rate and the lowest failing rate above it;
    multiplies the top rate by ``growth`` when every rate passes and divides the bottom one when
    every rate fails.
    """
    finite = [(rate, att) for rate, att in points if math.isfinite(rate) and rate > 0]
    if not finite:
        raise ValueError("the goodput search needs at least one measured finite rate")
    if growth <= 1:
        raise ValueError(f"growth must be > 1, got {growth}")
    best = goodput(finite, target)
    if best is None:
        return min(rate for rate, _ in finite) / growth
    failing_above = [rate for rate, att in finite if rate > best and att < target]
    if not failing_above:
        return best * growth
    return math.sqrt(best * min(failing_above))
