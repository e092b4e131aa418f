"""The operator's config as a validated, immutable model.

The model is the single source of truth for field names and defaults; reading
YAML, substituting `${ENV}` and wording errors live in `loader.py`.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

Strategy = Literal[
    "round_robin", "weighted", "least_request",  # configured weights only
    "health_aware", "cost_optimized", "performance_based", "quality_based", "adaptive_learning", "balanced",
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
STATIC_STRATEGIES = frozenset({"round_robin", "weighted", "least_request"})

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,512}")  # xDS and API tokens (from the environment)
_TOKEN_RULE = "token must be 16 to 512 letters, digits, '-' or '_' (e.g. openssl rand -hex 32)"


def parse_duration(value: Any) -> timedelta:
    """Accept `500ms`, `2s`, `1m`, `1h`, `1m30s` or a bare number of seconds."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration; use e.g. 500ms, 2s, 1m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if seconds <= 0:
        raise ValueError("duration must be greater than zero")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
# A model name as apps send it and providers spell it (`gpt-4o-mini`, `meta-llama/Llama-3-8B`,
# `claude-3-5-sonnet@20240620`). No quotes, spaces or backslashes: Envoy matches it in headers
# and rewrites it in JSON bodies, where those would need escaping.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")
DEFAULT_MODEL = "*"  # in `match.models`: this pool takes every model no other pool names


def _model_name(value: Any, allow_default: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError("a model name must be a string (quote it if YAML reads it as a number)")
    if allow_default and value == DEFAULT_MODEL:
        return value
    if not _MODEL_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a model name: up to 128 letters, digits and _ . : / @ + -, "
            "starting with a letter or digit" + (" (or '*' for every other model)" if allow_default else ""))
    return value


ModelName = Annotated[str, BeforeValidator(_model_name)]
ModelMatch = Annotated[str, BeforeValidator(lambda v: _model_name(v, allow_default=True))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(_Model):
    address: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (e.g. 127.0.0.1)") from None
        return value

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class ListenerSettings(Address):
    """Where apps connect, and the limits that protect Envoy from them."""

    port: int = Field(10000, ge=1, le=65535)
    max_connections: int = Field(10000, ge=1)  # across all listeners (overload manager)
    max_request_headers_kb: int = Field(60, ge=1, le=8192)
    max_headers_count: int = Field(100, ge=1)
    # The largest request body Envoy reads to route by model (bigger: 413), and the largest
    # non-streamed JSON answer it reads usage from. 16 MiB holds a chat request with images.
    per_connection_buffer_limit_kb: int = Field(16384, ge=64, le=1048576)
    request_headers_timeout: Duration = timedelta(seconds=10)
    idle_timeout: Duration = timedelta(minutes=5)


class EnvoySettings(_Model):
    listener: ListenerSettings = ListenerSettings()
    admin: Address = Address(port=9901)
    concurrency: int | None = Field(None, ge=1, le=64)
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "info"
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"


class Alerts(_Model):
    """Where alert events go, how often conditions are checked, and how many events a minute may be sent.

    Each condition fires once while it holds and sends a matching `resolved`
    event when it clears; beyond `max_per_minute` events wait their turn.
    """

    webhook: str | None = None  # POSTed a JSON body per event
    timeout: Duration = timedelta(seconds=5)
    interval: Duration = timedelta(seconds=2)  # how often the conditions are evaluated
    max_per_minute: int = Field(30, ge=1, le=6000)

    @field_validator("webhook")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("webhook must be an http:// or https:// URL")
        return value


class XdsTls(_Model):
    """Mutual TLS between Envoy and the control plane: the option for Envoys on other hosts.

    Paths are PEM files. The control plane presents `cert_file` and accepts only
    clients whose certificate `ca_file` signed; Envoy presents `envoy_cert_file`
    (paths as Envoy sees them) and checks the control plane's certificate
    against the same CA and `server_name`.
    """

    ca_file: str
    cert_file: str
    key_file: str
    envoy_cert_file: str
    envoy_key_file: str
    server_name: str | None = None  # the name in the control plane's certificate; default: the xds address


class XdsSettings(Address):
    """The gRPC port Envoy streams from (ADS) and reports to (access log): every stream must authenticate.

    `token` names an environment variable (`${LLM_LB_XDS_TOKEN}`); without one
    the control plane makes a fresh token at each start and writes it to
    `<state dir>/xds-token` (owner-only) for the Envoys it bootstraps.
    """

    port: int = Field(18000, ge=1, le=65535)
    token: SecretStr | None = Field(None, repr=False)
    tls: XdsTls | None = None

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError(_TOKEN_RULE)
        return value


class ApiSettings(Address):
    """The operator's HTTP API and live page. Mutations (drain, undrain, feedback) need
    `Authorization: Bearer <token>`; without a token the API may only bind loopback."""

    port: int = Field(8088, ge=1, le=65535)
    token: SecretStr | None = Field(None, repr=False)

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError(_TOKEN_RULE)
        return value

    @model_validator(mode="after")
    def _loopback_without_token(self) -> ApiSettings:
        if self.token is None and not ipaddress.ip_address(self.address).is_loopback:
            raise ValueError(
                f"address {self.address} is reachable from other hosts, so the API needs a token: set "
                "token: \"${LLM_LB_API_TOKEN}\" (e.g. openssl rand -hex 32), or bind 127.0.0.1")
        return self


class ControlPlaneSettings(_Model):
    xds: XdsSettings = XdsSettings()
    api: ApiSettings = ApiSettings()
    # An Envoy admin URL whose /clusters shows which hosts Envoy has ejected or finds failing its
    # checks (metrics, alerts, the live page); default: the managed Envoy's own admin.
    envoy_admin: str | None = None

    @field_validator("envoy_admin")
    @classmethod
    def _admin_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError("envoy_admin must be http://host:port (Envoy's admin interface)")
        return value
    resolve_interval: Duration = timedelta(seconds=30)
    # Spend is written to the ledger this often, in one transaction; a crash loses at most this much.
    spend_flush_interval: Duration = timedelta(seconds=1)
    alerts: Alerts = Alerts()


class Match(_Model):
    """Which requests a pool takes: a path prefix, and optionally the models the JSON body names.

    With `models`, Envoy reads the body's `model` and only those names (or, for
    `"*"`, every name no other pool serves) reach the pool; a request naming no
    model, or one nobody serves, is answered by Envoy with 400 or 404.
    """

    prefix: str = "/"
    models: list[ModelMatch] | None = Field(None, min_length=1)

    @field_validator("prefix")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("prefix must start with '/'")
        if any(c in value for c in "?#") or any(ord(c) < 0x21 for c in value):
            raise ValueError("prefix must be a plain path (no spaces, '?' or '#')")
        return value

    @field_validator("models")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            repeated = sorted({m for m in value if value.count(m) > 1})
            if repeated:
                raise ValueError(f"models lists {', '.join(repeated)} more than once")
        return value

    @property
    def default(self) -> bool:
        return self.models is not None and DEFAULT_MODEL in self.models

    @property
    def named_models(self) -> list[str]:
        """The exact names this pool serves (without `*`)."""
        return [m for m in self.models or () if m != DEFAULT_MODEL]


class HealthCheck(_Model):
    """Envoy's active HTTP checks; each endpoint is checked with its own Host header."""

    path: str = "/health"
    interval: Duration = timedelta(seconds=5)
    timeout: Duration = timedelta(seconds=2)
    healthy_threshold: int = Field(2, ge=1)
    unhealthy_threshold: int = Field(2, ge=1)
    expected_statuses: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=lambda: [200], min_length=1)

    @field_validator("path")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("path must start with '/'")
        return value


class OutlierDetection(_Model):
    """Passive ejection from real traffic: the fast path when a backend dies between checks."""

    enabled: bool = True
    consecutive_5xx: int = Field(5, ge=1)
    consecutive_gateway_failure: int = Field(3, ge=1)
    failure_percentage_threshold: int | None = Field(50, ge=1, le=100)
    failure_percentage_request_volume: int = Field(20, ge=1)
    failure_percentage_minimum_hosts: int = Field(2, ge=1)
    success_rate_stdev_factor: float | None = Field(None, gt=0)
    success_rate_request_volume: int = Field(50, ge=1)
    success_rate_minimum_hosts: int = Field(3, ge=1)
    interval: Duration = timedelta(seconds=2)
    base_ejection_time: Duration = timedelta(seconds=15)
    max_ejection_time: Duration = timedelta(minutes=5)
    max_ejection_percent: int = Field(50, ge=0, le=100)


class RetryBudget(_Model):
    """Retries in flight may be this share of active requests (or at least the minimum).

    A backend that dies fails all its in-flight requests at once, i.e. 1/N of
    the pool's: the budget must cover that for N = 2, hence 50%.
    """

    budget_percent: float = Field(50.0, gt=0, le=100)
    min_retry_concurrency: int = Field(32, ge=1)


class CircuitBreaker(_Model):
    """Per pool (Envoy's default routing priority); overflow answers 503 at once."""

    max_connections: int = Field(1024, ge=1)
    max_pending_requests: int = Field(1024, ge=1)
    max_requests: int = Field(1024, ge=1)
    max_retries: int = Field(3, ge=0)  # used only when retry_budget is null
    retry_budget: RetryBudget | None = RetryBudget()


RetryOn = Literal[
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-status-codes",
    "envoy-ratelimited", "http3-post-connect-failure",
]


DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("5xx", "reset", "connect-failure", "refused-stream", "retriable-status-codes")


class Backoff(_Model):
    base_interval: Duration = timedelta(milliseconds=25)
    max_interval: Duration = timedelta(milliseconds=250)
    # A 429's Retry-After / x-ratelimit-reset up to this long is waited before the retry (which goes
    # to another backend); a longer one is ignored and the back-off above applies.
    max_rate_limited_interval: Duration = timedelta(seconds=1)


class Retry(_Model):
    """Retries always go to another host than the one that failed."""

    attempts: int = Field(2, ge=0, le=10)
    retry_on: list[RetryOn] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=lambda: [429])
    per_try_timeout: Duration | None = None
    backoff: Backoff = Backoff()


class Objective(_Model):
    """How much each outcome counts, for `balanced` and the `adaptive_learning` reward."""

    quality: float = Field(1.0, ge=0)
    cost: float = Field(1.0, ge=0)
    latency: float = Field(0.5, ge=0)
    errors: float = Field(2.0, ge=0)


class Scoring(_Model):
    """How telemetry becomes weights: cadence, smoothing, exploration."""

    interval: Duration = timedelta(seconds=2)
    exploration_floor: float = Field(0.02, ge=0, le=0.5)  # min share of every healthy backend
    smoothing: float = Field(0.5, gt=0, le=1)  # share of the new target taken each interval
    hysteresis: float = Field(0.02, ge=0, le=0.5)  # smallest share change worth a push
    min_quality: float | None = Field(None, ge=0, le=1)
    # A backend excluded for min_quality returns only at min_quality + reentry_margin (it leaves below
    # min_quality): an estimate hovering at the threshold does not flap in and out of rotation.
    reentry_margin: float = Field(0.02, ge=0, le=0.5)
    # Re-discovery: a backend out of rotation for quality or score (min_quality, or a strategy share
    # under this) still gets this share, so ratings keep its estimates current; 0 turns it off. Never
    # given to a backend that is unhealthy, ejected or failing checks in Envoy's view, draining or cooling.
    probe_share: float = Field(0.01, ge=0, le=0.1)
    quality_prior_weight: float = Field(10.0, gt=0)  # the prior counts as this many feedback scores
    # The quality estimate's memory, in ratings: each rating multiplies the weight of the earlier ones by
    # 1 - 1/memory_ratings, so at most this many ratings' worth of evidence counts (half of it from the
    # latest ~0.69 x memory_ratings). adaptive_learning's reward posterior forgets at the same rate per request.
    memory_ratings: float = Field(100.0, ge=2)
    objective: Objective = Objective()
    seed: int = 0


class DeepHealth(_Model):
    """The control plane reads each backend's health JSON (or OpenAI-style /models)."""

    path: str = "/health"
    format: Literal["json", "openai_models"] = "json"
    interval: Duration = timedelta(seconds=5)
    timeout: Duration = timedelta(seconds=2)


class Budget(_Model):
    hourly: float | None = Field(None, gt=0)
    daily: float | None = Field(None, gt=0)
    alert_thresholds: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.7, 0.9])
    on_exhausted: Literal["shift_to_cheapest", "reject"] = "shift_to_cheapest"

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.hourly is None and self.daily is None:
            raise ValueError("a budget needs hourly, daily or both")
        return self


class PoolAlerts(_Model):
    """When a pool's condition is worth an alert; rates and percentiles are over the last `window`."""

    min_available: float = Field(0.5, ge=0, le=1)  # share of backends Envoy can send to (not ejected/failing)
    max_error_rate: float | None = Field(0.25, gt=0, le=1)
    max_p95_latency: Duration | None = None
    min_requests: int = Field(20, ge=1)  # in the window, before error rate or p95 are judged
    window: Duration = timedelta(seconds=60)


class ClientLimits(_Model):
    """Enforced by Envoy for requests (its local rate limit) and by the control plane for tokens (from the
    access log, a route change once a client is over): see the README on how exact each is."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)


class ClientBudget(_Model):
    """Spend per client; exhausted: Envoy answers the client's requests 429 naming the budget until the
    window rolls over."""

    hourly: float | None = Field(None, gt=0)
    daily: float | None = Field(None, gt=0)
    alert_thresholds: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.7, 0.9])

    @model_validator(mode="after")
    def _some_limit(self) -> ClientBudget:
        if self.hourly is None and self.daily is None:
            raise ValueError("a budget needs hourly, daily or both")
        return self


# An API key as clients send it (`Authorization: Bearer <key>` or `x-api-key`): printable, no spaces.
_CLIENT_KEY = re.compile(r"[\x21-\x7e]{16,512}")


class Client(_Model):
    """Who may call the listener (once any client is configured, every request needs a key)."""

    key: SecretStr = Field(repr=False)
    limits: ClientLimits = ClientLimits()
    budget: ClientBudget | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr) -> SecretStr:
        if not _CLIENT_KEY.fullmatch(value.get_secret_value()):
            raise ValueError("key must be 16 to 512 printable characters without spaces "
                             "(e.g. openssl rand -hex 32)")
        return value


class Cost(_Model):
    input_per_1k: float = Field(0.0, ge=0)
    output_per_1k: float = Field(0.0, ge=0)


class Backend(_Model):
    url: str
    api_key: SecretStr | None = None
    api_key_header: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]+$")] = "authorization"
    weight: int = Field(1, ge=1, le=10000)
    priority: int = Field(0, ge=0, le=9)
    cost: Cost = Cost()
    quality: float = Field(0.5, ge=0, le=1)
    expected_latency_ms: float | None = Field(None, gt=0)
    # The provider's quota: the control plane caps this backend's share so its projected rate stays under.
    max_requests_per_minute: int | None = Field(None, ge=1)
    max_tokens_per_minute: int | None = Field(None, ge=1)
    # The model name this backend expects; Envoy rewrites the body's `model` to it for this backend only.
    model: ModelName | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise ValueError("URL must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("URL has no host")
        if parts.username or parts.password:
            raise ValueError("URL must not hold credentials; use api_key")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                "URL must be scheme://host[:port] only; the request path is forwarded as sent"
            )
        try:
            _ = parts.port  # raises on a bad port
        except ValueError:
            raise ValueError("URL port is not a number in 1..65535") from None
        return value

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (443 if self.tls else 80)

    @property
    def auth_value(self) -> str | None:
        """The header value Envoy sends upstream: `Bearer <key>` for authorization."""
        if self.api_key is None:
            return None
        key = self.api_key.get_secret_value()
        return f"Bearer {key}" if self.api_key_header == "authorization" else key


RolloutMode = Literal["canary", "ab", "shadow"]


class ErrorGate(_Model):
    """Wald's sequential test on the candidate's failed attempts: `baseline_rate` is acceptable,
    `bad_rate` is not; alpha is the chance of failing a good candidate, beta of passing a bad one.
    Checked at every tick without inflating false alarms (README: Rollouts)."""

    baseline_rate: float = Field(0.02, gt=0, lt=1)
    bad_rate: float = Field(0.10, gt=0, lt=1)
    alpha: float = Field(0.01, gt=0, lt=0.5)
    beta: float = Field(0.05, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _ordered(self) -> ErrorGate:
        if self.bad_rate <= self.baseline_rate:
            raise ValueError(f"bad_rate ({self.bad_rate:g}) must be above baseline_rate ({self.baseline_rate:g})")
        return self


class QualityGate(_Model):
    """Feedback: the candidate's mean score minus the baseline's may not fall below `min_delta`,
    judged once the candidate has `min_feedback` scores (until then the last step cannot pass)."""

    min_delta: float = Field(-0.03, ge=-1, le=1)
    min_feedback: int = Field(50, ge=1)


class Gates(_Model):
    """What a step must show before the next one; any gate failing fails the rollout at once."""

    errors: ErrorGate | None = ErrorGate()
    # The candidate's p95 time to first byte over the baseline's; and of latency per output token
    # (total latency depends on answer length, so it is not compared).
    ttfb_p95_ratio: float | None = Field(1.25, gt=1)
    token_latency_p95_ratio: float | None = Field(None, gt=1)
    quality: QualityGate | None = None
    cost_ratio: float | None = Field(None, gt=0)  # candidate's mean cost per request over the baseline's
    # The candidate has traffic due but showed no request (nor failed attempt) this long while the
    # baseline did: refusing connections, ejected, unreachable.
    no_data_after: Duration | None = timedelta(minutes=2)


class ShadowSettings(_Model):
    """Mirror a share of requests to the candidate; clients only ever see the primary's answer."""

    percent: float = Field(100.0, gt=0, le=100)
    budget: float = Field(gt=0)  # USD the candidate's shadow answers may cost in this rollout; then mirroring stops
    # When the shadow passes its gates: stop with a report, or go on as a canary from the first step.
    then: Literal["stop", "canary"] = "stop"
    max_requests: int = Field(64, ge=1)  # the shadow cluster's circuit breaker: mirrored requests in flight


CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})


class AbSettings(_Model):
    """A fixed split; sticky per user when requests name one in `user_header` (Envoy hashes it)."""

    percent: float = Field(50.0, gt=0, lt=100)  # the candidate's share
    user_header: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]+$")] | None = "x-user-id"
    alpha: float = Field(0.05, gt=0, lt=0.5)  # the readout's intervals are 1 - alpha

    @field_validator("user_header")
    @classmethod
    def _not_a_secret(cls, value: str | None) -> str | None:
        if value in CREDENTIAL_HEADERS:
            raise ValueError(f"user_header {value!r} carries credentials; name a header that identifies the "
                             "user without authenticating them (e.g. x-user-id)")
        return value


class Rollout(_Model):
    """Move traffic to `candidate` through gated steps, mirror it (shadow), or split it (A/B)."""

    mode: RolloutMode = "canary"
    candidate: Name
    baseline: list[Name] | None = Field(None, min_length=1)  # default: the other backends of the candidate's tier
    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field(
        default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0], min_length=1)
    step_duration: Duration = timedelta(minutes=5)
    min_requests: int = Field(200, ge=1)  # candidate requests per step before it can pass
    max_step_duration: Duration = timedelta(minutes=30)  # a step still undecided then: paused as inconclusive
    on_failure: Literal["rollback", "pause"] = "rollback"
    gates: Gates = Gates()
    shadow: ShadowSettings | None = None
    ab: AbSettings = AbSettings()

    @field_validator("steps")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("steps must increase (each is the candidate's share of traffic, in percent)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Rollout:
        if self.max_step_duration <= self.step_duration:
            raise ValueError("max_step_duration must be longer than step_duration")
        if self.mode == "shadow" and self.shadow is None:
            raise ValueError("mode shadow needs a shadow block with at least its budget (USD), e.g. "
                             "shadow: {percent: 50, budget: 5}")
        return self


class Pool(_Model):
    match: Match = Match()
    strategy: Strategy = "weighted"
    timeout: Duration = timedelta(seconds=60)
    connect_timeout: Duration = timedelta(seconds=5)
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection = OutlierDetection()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    retry: Retry = Retry()
    # Tier 0 takes min(100%, healthy% x factor) of traffic; the rest spills to tier 1.
    overprovisioning_factor: float = Field(1.4, ge=1.0, le=1000.0)
    # Below this healthy share Envoy would also send to unhealthy hosts; 0 never does.
    panic_threshold: float = Field(0.0, ge=0, le=100)
    scoring: Scoring = Scoring()
    deep_health: DeepHealth | None = None
    budget: Budget | None = None
    alerts: PoolAlerts = PoolAlerts()
    rollout: Rollout | None = None
    backends: dict[Name, Backend] = Field(min_length=1)

    @model_validator(mode="after")
    def _per_try_below_timeout(self) -> Pool:
        per_try = self.retry.per_try_timeout
        if per_try is not None and per_try >= self.timeout:
            raise ValueError(
                f"retry.per_try_timeout ({per_try.total_seconds():g}s) must be shorter than timeout "
                f"({self.timeout.total_seconds():g}s), or no retry could ever start"
            )
        return self

    @model_validator(mode="after")
    def _rollout_backends(self) -> Pool:
        rollout = self.rollout
        if rollout is None:
            return self
        candidate = self.backends.get(rollout.candidate)
        if candidate is None:
            raise ValueError(f"rollout.candidate {rollout.candidate!r} is not a backend of this pool "
                             f"(backends: {', '.join(sorted(self.backends))})")
        for name in rollout.baseline or ():
            if name not in self.backends:
                raise ValueError(f"rollout.baseline names {name!r}, not a backend of this pool")
            if name == rollout.candidate:
                raise ValueError("rollout.baseline must not name the candidate")
            if self.backends[name].priority != candidate.priority:
                raise ValueError(f"rollout.baseline {name!r} is in priority tier {self.backends[name].priority}, "
                                 f"the candidate in tier {candidate.priority}: Envoy splits traffic by weight "
                                 "within a tier only")
        if not self.rollout_baseline():
            raise ValueError(f"rollout: no baseline; the candidate's tier ({candidate.priority}) has no other "
                             "backend to compare it with")
        tier = sorted(n for n, b in self.backends.items() if b.priority == candidate.priority and n != rollout.candidate)
        if rollout.mode == "ab" and sorted(self.rollout_baseline()) != tier:
            raise ValueError(f"rollout: an A/B test splits the candidate's tier in two, so its baseline is the rest "
                             f"of the tier ({', '.join(tier)}); leave baseline out")
        return self

    def rollout_baseline(self) -> list[str]:
        """The backends the candidate is compared with: as configured, else the rest of its tier."""
        rollout = self.rollout
        if rollout is None:
            return []
        if rollout.baseline is not None:
            return list(rollout.baseline)
        tier = self.backends[rollout.candidate].priority
        return sorted(n for n, b in self.backends.items() if b.priority == tier and n != rollout.candidate)


class Config(_Model):
    envoy: EnvoySettings = EnvoySettings()
    controlplane: ControlPlaneSettings = ControlPlaneSettings()
    clients: dict[Name, Client] = Field(default_factory=dict)  # none: the listener is open to whoever reaches it
    pools: dict[Name, Pool] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems: list[str] = []
        seen: dict[int, tuple[str, str]] = {}
        for label, addr in self.listen_addresses().items():
            other = seen.get(addr.port)
            if other and _overlap(other[1], addr.address):
                problems.append(f"port {addr.port} of {label} is also used by {other[0]}")
            seen.setdefault(addr.port, (label, addr.address))
        problems += _routing_conflicts(self.pools)
        problems += _shared_keys(self.clients)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def routes_by_model(self) -> bool:
        return any(pool.match.models is not None for pool in self.pools.values())

    def served_models(self) -> dict[str, str]:
        """Every model name apps may send, and the pool serving it (what `/v1/models` lists)."""
        return {m: name for name, pool in sorted(self.pools.items()) for m in pool.match.named_models}

    def listen_addresses(self) -> dict[str, Address]:
        return {
            "envoy.listener": self.envoy.listener,
            "envoy.admin": self.envoy.admin,
            "controlplane.xds": self.controlplane.xds,
            "controlplane.api": self.controlplane.api,
        }


def _routing_conflicts(pools: dict[str, Pool]) -> list[str]:
    """Two pools must never both claim a request: same prefix without models, or the same model
    (or both `*`) where one pool's prefix covers the other's."""
    problems: list[str] = []
    items = sorted(pools.items())
    defaults = [name for name, pool in items if pool.match.default]
    if len(defaults) > 1:
        problems.append(f"pools {', '.join(map(repr, defaults))} all list '*' in match.models; "
                        "one pool at most may take the models no pool names")
    for i, (a, pa) in enumerate(items):
        for b, pb in items[i + 1:]:
            ma, mb = pa.match, pb.match
            if ma.prefix == mb.prefix and (ma.models is None or mb.models is None):
                problems.append(
                    f"pools {a!r} and {b!r} both have match.prefix {ma.prefix!r}; give each its "
                    "match.models (one may list '*' for the rest) or different prefixes")
                continue
            if ma.models is None or mb.models is None:
                continue  # a longer prefix without models simply wins its paths
            if not (ma.prefix.startswith(mb.prefix) or mb.prefix.startswith(ma.prefix)):
                continue
            both = sorted(set(ma.named_models) & set(mb.named_models))
            if both:
                problems.append(
                    f"pools {a!r} (prefix {ma.prefix!r}) and {b!r} (prefix {mb.prefix!r}) both serve "
                    f"model {', '.join(map(repr, both))}: a model may be served by one pool per path")
    return problems


def _shared_keys(clients: dict[str, Client]) -> list[str]:
    """A key names one client: two clients with one key could not be told apart (named, never shown)."""
    owners: dict[str, list[str]] = {}
    for name, client in sorted(clients.items()):
        owners.setdefault(client.key.get_secret_value(), []).append(name)
    return [f"clients {', '.join(map(repr, names))} have the same key; each client needs its own"
            for names in owners.values() if len(names) > 1]


def _overlap(a: str, b: str) -> bool:
    wildcard = {"0.0.0.0", "::"}
    return a == b or a in wildcard or b in wildcard
