"""The OpenTelemetry GenAI metrics, as Prometheus histograms in base units, counted from the access log.

    gen_ai_server_request_duration_seconds      the request, from Envoy's first byte in to last byte out
    gen_ai_server_time_to_first_token_seconds   to the backend's first response byte (streams: the first chunk)
    gen_ai_client_token_usage                   tokens per request, by gen_ai_token_type (input / output)

Labels: pool, backend, gen_ai_request_model, gen_ai_response_model. Model names come from clients, so
each backend keeps at most MAX_MODELS distinct pairs; the rest count under OTHER_MODEL, and the label
set stays bounded whatever the clients send. Buckets are the OTel semantic conventions' advice.

Counting is a bisect and a few list increments per request (no prometheus_client objects on the hot
path); the families are built at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import HistogramMetricFamily

DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
MAX_MODELS = 20  # distinct (requested, served) model pairs per backend; more count as OTHER_MODEL
OTHER_MODEL = "_other"
LABELS = ["pool", "backend", "gen_ai_request_model", "gen_ai_response_model"]
TOKEN_LABELS = [*LABELS, "gen_ai_token_type"]


@dataclass
class _Histogram:
    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), plus +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound falls in it
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*map(_le, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


def _le(bound: float) -> str:
    return str(float(bound))


@dataclass
class _Series:
    duration: _Histogram = field(default_factory=lambda: _Histogram(DURATION_BUCKETS))
    ttft: _Histogram = field(default_factory=lambda: _Histogram(TTFT_BUCKETS))
    input_tokens: _Histogram = field(default_factory=lambda: _Histogram(TOKEN_BUCKETS))
    output_tokens: _Histogram = field(default_factory=lambda: _Histogram(TOKEN_BUCKETS))


class GenAiHistograms:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self._models: dict[tuple[str, str], int] = {}  # distinct model pairs seen per backend

    def observe(self, pool: str, backend: str, requested_model: str, served_model: str, duration_s: float,
                ttft_s: float | None, input_tokens: int, output_tokens: int) -> None:
        key = (pool, backend, requested_model, served_model)
        series = self._series.get(key)
        if series is None:
            series = self._new(key)
        series.duration.observe(duration_s)
        if ttft_s is not None:
            series.ttft.observe(ttft_s)
        series.input_tokens.observe(input_tokens)
        series.output_tokens.observe(output_tokens)

    def _new(self, key: tuple[str, str, str, str]) -> _Series:
        pool, backend = key[0], key[1]
        seen = self._models.get((pool, backend), 0)
        if seen >= MAX_MODELS:
            key = (pool, backend, OTHER_MODEL, OTHER_MODEL)
            series = self._series.get(key)
            if series is not None:
                return series
        else:
            self._models[(pool, backend)] = seen + 1
        series = self._series[key] = _Series()
        return series

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Drop the series of backends no longer in the config."""
        for key in [k for k in self._series if (k[0], k[1]) not in keys]:
            del self._series[key]
        for pair in [k for k in self._models if k not in keys]:
            del self._models[pair]

    def families(self) -> Iterator[HistogramMetricFamily]:
        duration = HistogramMetricFamily(
            "gen_ai_server_request_duration_seconds", "GenAI request duration, as Envoy saw it", labels=LABELS,
            unit="seconds")
        ttft = HistogramMetricFamily(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the backend's first response byte (the first chunk of a stream)", labels=LABELS, unit="seconds")
        tokens = HistogramMetricFamily(
            "gen_ai_client_token_usage", "Tokens per request, by type (reported by the backend, else estimated)",
            labels=TOKEN_LABELS)
        for (pool, backend, requested, served), series in sorted(self._series.items()):
            labels = [pool, backend, requested, served]
            duration.add_metric(labels, series.duration.buckets(), series.duration.total)
            if series.ttft.total or any(series.ttft.counts):
                ttft.add_metric(labels, series.ttft.buckets(), series.ttft.total)
            tokens.add_metric([*labels, "input"], series.input_tokens.buckets(), series.input_tokens.total)
            tokens.add_metric([*labels, "output"], series.output_tokens.buckets(), series.output_tokens.total)
        yield duration
        yield ttft
        yield tokens
