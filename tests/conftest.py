"""Shared fixtures."""

from __future__ import annotations

import pytest

from .harness import MockBackend


@pytest.fixture
def mocks():
    """Start mock backend processes by name (`mocks("a", "--latency-ms", "50")`); all stopped after the test."""
    started: list[MockBackend] = []

    def make(name: str, *args: str) -> MockBackend:
        started.append(MockBackend(name, args=list(args)))
        return started[-1]

    yield make
    for backend in started:
        backend.stop()
