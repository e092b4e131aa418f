"""Deep health verdicts: what a backend says about itself, weighed against how it said it."""

from __future__ import annotations

import json

import pytest

from controlplane.telemetry.health import DEGRADED, HEALTHY, UNHEALTHY, Verdict, judge_json, judge_models


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


JSON_CASES = [
    # id, http status, body, score, detail fragment
    ("healthy", 200, body({"status": "healthy"}), HEALTHY, "'healthy'"),
    ("ok-alias", 200, body({"status": "ok"}), HEALTHY, "'ok'"),
    ("up-uppercase", 200, body({"status": "UP"}), HEALTHY, "'UP'"),
    ("pass-alias", 200, body({"status": "pass"}), HEALTHY, "'pass'"),
    ("degraded", 200, body({"status": "degraded"}), DEGRADED, "'degraded'"),
    ("warn-alias", 200, body({"status": "warn"}), DEGRADED, "'warn'"),
    ("unhealthy", 200, body({"status": "unhealthy"}), UNHEALTHY, "'unhealthy'"),
    ("down-alias", 200, body({"status": "down"}), UNHEALTHY, "'down'"),
    ("fail-alias", 200, body({"status": "fail"}), UNHEALTHY, "'fail'"),
    ("error-alias", 200, body({"status": "error"}), UNHEALTHY, "'error'"),
    ("503-but-says-healthy", 503, body({"status": "healthy"}), UNHEALTHY, "503"),
    ("500-no-body", 500, b"", UNHEALTHY, "500"),
    ("invalid-json", 200, b"<html>fine</html>", DEGRADED, "without valid JSON"),
    ("empty-body", 200, b"", DEGRADED, "without valid JSON"),
    ("non-object-list", 200, body(["healthy"]), DEGRADED, "not an object"),
    ("non-object-string", 200, body("healthy"), DEGRADED, "not an object"),
    ("missing-status", 200, body({"llm_status": "up"}), DEGRADED, "no known status (got None)"),
    ("unknown-status", 200, body({"status": "great"}), DEGRADED, "no known status (got 'great')"),
    ("non-string-status", 200, body({"status": 1}), DEGRADED, "no known status (got 1)"),
    ("llm-down", 200, body({"status": "healthy", "llm_status": "down"}), DEGRADED, "llm_status report trouble"),
    ("part-degraded", 200, body({"status": "healthy", "graph_db_status": "degraded"}), DEGRADED,
     "graph_db_status report trouble"),
    ("two-parts-failed", 200, body({"status": "ok", "vector_db_status": "error", "llm_status": "FAILED"}),
     DEGRADED, "llm_status, vector_db_status report trouble"),
    ("part-up", 200, body({"status": "healthy", "llm_status": "up"}), HEALTHY, "'healthy'"),
    ("non-status-key-ignored", 200, body({"status": "healthy", "llm": "down"}), HEALTHY, "'healthy'"),
    ("unhealthy-with-part-down-stays-unhealthy", 200, body({"status": "unhealthy", "llm_status": "down"}),
     UNHEALTHY, "'unhealthy'"),
    ("4xx-says-healthy", 404, body({"status": "healthy"}), DEGRADED, "HTTP 404"),
    ("4xx-says-unhealthy", 429, body({"status": "unhealthy"}), UNHEALTHY, "'unhealthy'"),
]


@pytest.mark.parametrize(("http_status", "raw", "score", "detail"),
                         [pytest.param(*c[1:], id=c[0]) for c in JSON_CASES])
def test_judge_json(http_status: int, raw: bytes, score: float, detail: str) -> None:
    verdict = judge_json(http_status, raw)
    assert isinstance(verdict, Verdict)
    assert verdict.score == score
    assert verdict.status == {HEALTHY: "healthy", DEGRADED: "degraded", UNHEALTHY: "unhealthy"}[score]
    assert detail in verdict.detail


def test_scores_are_ordered() -> None:
    assert (UNHEALTHY, DEGRADED, HEALTHY) == (0.0, 0.5, 1.0)


OK_MODELS = body({"object": "list", "data": [{"id": "gpt-4o-mini"}]})

MODELS_CASES = [
    # id, http status, body, headers, score, detail fragment
    ("lists-models", 200, OK_MODELS, {}, HEALTHY, "lists models"),
    ("empty-list-is-still-a-list", 200, body({"data": []}), {}, HEALTHY, "lists models"),
    ("401", 401, b'{"error": "bad key"}', {}, UNHEALTHY, "key rejected (401)"),
    ("403", 403, OK_MODELS, {}, UNHEALTHY, "key rejected (403)"),
    ("429", 429, b"", {}, DEGRADED, "rate limited (429)"),
    ("404", 404, b"", {}, UNHEALTHY, "/models answered 404"),
    ("502", 502, OK_MODELS, {}, UNHEALTHY, "/models answered 502"),
    ("invalid-json", 200, b"not json", {}, DEGRADED, "did not list models"),
    ("no-data-key", 200, body({"models": ["a"]}), {}, DEGRADED, "did not list models"),
    ("data-not-a-list", 200, body({"data": "a"}), {}, DEGRADED, "did not list models"),
    ("top-level-list", 200, body([{"id": "a"}]), {}, DEGRADED, "did not list models"),
    ("plenty-left", 200, OK_MODELS,
     {"x-ratelimit-remaining-requests": "500", "x-ratelimit-limit-requests": "1000"}, HEALTHY, "500/1000"),
    ("exactly-ten-percent-left", 200, OK_MODELS,
     {"x-ratelimit-remaining-requests": "100", "x-ratelimit-limit-requests": "1000"}, HEALTHY, "100/1000"),
    ("under-ten-percent-left", 200, OK_MODELS,
     {"x-ratelimit-remaining-requests": "99", "x-ratelimit-limit-requests": "1000"}, DEGRADED,
     "99 of 1000 requests left"),
    ("none-left-mixed-case-headers", 200, OK_MODELS,
     {"X-RateLimit-Remaining-Requests": "0", "X-RateLimit-Limit-Requests": "60"}, DEGRADED, "0 of 60"),
    ("junk-headers-ignored", 200, OK_MODELS,
     {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-limit-requests": "1000"}, HEALTHY, "lists models"),
    ("only-one-header", 200, OK_MODELS, {"x-ratelimit-remaining-requests": "0"}, HEALTHY, "lists models"),
    ("zero-limit-ignored", 200, OK_MODELS,
     {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "0"}, HEALTHY, "0/0"),
]


@pytest.mark.parametrize(("http_status", "raw", "headers", "score", "detail"),
                         [pytest.param(*c[1:], id=c[0]) for c in MODELS_CASES])
def test_judge_models(http_status: int, raw: bytes, headers: dict[str, str], score: float, detail: str) -> None:
    verdict = judge_models(http_status, raw, headers)
    assert verdict.score == score
    assert verdict.status == {HEALTHY: "healthy", DEGRADED: "degraded", UNHEALTHY: "unhealthy"}[score]
    assert detail in verdict.detail
