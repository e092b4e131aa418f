"""The operator's YAML file as a validated, immutable model.

The model is the single source of truth for field names and defaults. Loading
never raises on the first problem: it collects every error, each naming the
file, line, pool, backend and field, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
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
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_FIELDS = frozenset({"api_key"})  # only from the environment, never echoed
_HIDDEN_FIELDS = _SECRET_FIELDS | {"webhook"}  # never echoed (webhook URLs often carry a token)


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
    per_connection_buffer_limit_kb: int = Field(1024, ge=1)
    request_headers_timeout: Duration = timedelta(seconds=10)
    idle_timeout: Duration = timedelta(minutes=5)


class EnvoySettings(_Model):
    listener: ListenerSettings = ListenerSettings()
    admin: Address = Address(port=9901)
    concurrency: int | None = Field(None, ge=1, le=64)
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = "info"
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"


class Alerts(_Model):
    webhook: str | None = None  # POSTed a JSON body per alert
    timeout: Duration = timedelta(seconds=5)

    @field_validator("webhook")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("webhook must be an http:// or https:// URL")
        return value


class ControlPlaneSettings(_Model):
    xds: Address = Address(port=18000)
    api: Address = Address(port=8088)
    resolve_interval: Duration = timedelta(seconds=30)
    alerts: Alerts = Alerts()


class Match(_Model):
    prefix: str = "/"

    @field_validator("prefix")
    @classmethod
    def _slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("prefix must start with '/'")
        return value


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


class Backoff(_Model):
    base_interval: Duration = timedelta(milliseconds=25)
    max_interval: Duration = timedelta(milliseconds=250)


class Retry(_Model):
    """Retries always go to another host than the one that failed."""

    attempts: int = Field(2, ge=0, le=10)
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: ["5xx", "reset", "connect-failure", "refused-stream", "retriable-status-codes"]
    )
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
    quality_prior_weight: float = Field(10.0, gt=0)  # the prior counts as this many feedback scores
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
    max_requests_per_minute: int | None = Field(None, ge=1)

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


class Config(_Model):
    envoy: EnvoySettings = EnvoySettings()
    controlplane: ControlPlaneSettings = ControlPlaneSettings()
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
        prefixes: dict[str, str] = {}
        for name, pool in self.pools.items():
            if pool.match.prefix in prefixes:
                problems.append(
                    f"pool {name!r} has match.prefix {pool.match.prefix!r}, "
                    f"already used by pool {prefixes[pool.match.prefix]!r}"
                )
            prefixes.setdefault(pool.match.prefix, name)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def listen_addresses(self) -> dict[str, Address]:
        return {
            "envoy.listener": self.envoy.listener,
            "envoy.admin": self.envoy.admin,
            "controlplane.xds": self.controlplane.xds,
            "controlplane.api": self.controlplane.api,
        }


def _overlap(a: str, b: str) -> bool:
    wildcard = {"0.0.0.0", "::"}
    return a == b or a in wildcard or b in wildcard


class ConfigError(Exception):
    """Every problem found in one file, one line each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    return parse_config(text, source=str(path), env=os.environ if env is None else env)


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    data, lines, errors = read_yaml(text, source, "a 'pools' section", "envoy, controlplane, pools")
    failed: set[tuple[Any, ...]] = set()
    data = _substitute(data, (), env, lines, errors, source, failed)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors += [
            describe_error(e, lines, source)
            for e in exc.errors()
            if _clean_loc(e["loc"]) not in failed
        ]
    if errors:
        raise ConfigError(errors)
    return config


def read_yaml(text: str, source: str, needs: str, top_keys: str) -> tuple[dict[str, Any], dict, list[str]]:
    """A YAML mapping, the line of every key, and the duplicate keys found (as errors).

    Syntax errors, an empty file and a top level that is not a mapping raise
    ConfigError at once: nothing further can be said about such a file.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{at}: YAML syntax error: {problem}"]) from None
    if root is None:
        raise ConfigError([f"{source}: file is empty; it needs at least {needs}"])
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the top level must be a mapping ({top_keys})"])
    lines: dict[tuple[Any, ...], int] = {}
    errors: list[str] = []
    _index_lines(root, (), lines, errors, source)
    return data, lines, errors


def _index_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict, errors: list[str], source: str) -> None:
    """Record the line of every key, and refuse duplicate keys (YAML would keep the last)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in first:
                errors.append(
                    f"{source}:{line}: {where(path + (key,))}: duplicate key {key!r} "
                    f"(first at line {first[key]})"
                )
                continue
            first[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, errors, source)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, errors, source)


def _substitute(
    value: Any,
    path: tuple[Any, ...],
    env: Mapping[str, str],
    lines: dict,
    errors: list[str],
    source: str,
    failed: set[tuple[Any, ...]],
) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string values from the environment."""
    if isinstance(value, dict):
        return {k: _substitute(v, path + (k,), env, lines, errors, source, failed) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, path + (i,), env, lines, errors, source, failed) for i, v in enumerate(value)]
    if path and path[-1] in _SECRET_FIELDS and value is not None:
        if not isinstance(value, str) or not _ENV_REF.fullmatch(value.strip()):
            errors.append(
                f"{source_line(path, lines, source)}: {where(path)}: must name an environment "
                "variable, e.g. ${PROVIDER_KEY}; keys are never written in config files"
            )
            failed.add(path)
            return None
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        errors.append(f"{source_line(path, lines, source)}: {where(path)}: environment variable {name} is not set")
        failed.add(path)
        return ""

    return _ENV_REF.sub(replace, value)


def source_line(path: tuple[Any, ...], lines: dict, source: str) -> str:
    """`file:line` of the nearest key along `path` that the file has."""
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{source}:{lines[path[:cut]]}"
    return source


def where(loc: tuple[Any, ...]) -> str:
    """Name the pool, backend and field of a location in words."""
    loc = tuple(loc)
    if len(loc) >= 2 and loc[0] == "pools":
        text = f"pool {loc[1]!r}"
        rest = loc[2:]
        if len(rest) >= 2 and rest[0] == "backends":
            text += f", backend {rest[1]!r}"
            rest = rest[2:]
        if rest:
            text += f", field {'.'.join(map(str, rest))!r}"
        return text
    return f"field {'.'.join(map(str, loc))!r}" if loc else "top level"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))


def describe_error(error: Any, lines: dict, source: str, model: type[BaseModel] | None = None) -> str:
    """One pydantic error as `file:line: pool ..., backend ..., field ...: message`."""
    loc = _clean_loc(error["loc"])
    msg: str = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], model or Config)
        msg = f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif error["type"] == "missing":
        msg = "required field is missing"
    elif error["type"] == "too_short" and loc and loc[-1] in ("pools", "backends"):
        msg = f"needs at least one entry under {loc[-1]!r}"
    elif (
        loc
        and loc[-1] not in _HIDDEN_FIELDS
        and not isinstance(error.get("input"), (dict, list, type(None)))
        and repr(error["input"]) not in msg
    ):
        msg += f" (got {error['input']!r})"
    return f"{source_line(loc, lines, source)}: {where(loc)}: {msg}"


def _allowed_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    """Walk the model along `loc` to list the keys that are valid there."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0]
    return annotation
