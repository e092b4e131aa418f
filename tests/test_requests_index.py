"""Which backend served which request, and feedback that arrives before the access log entry."""

from __future__ import annotations

from controlplane.telemetry.requests import RequestIndex, Served


def test_served_then_lookup() -> None:
    index = RequestIndex()
    assert index.lookup("r1") is None
    assert index.served("r1", "chat", "a") is None
    assert index.lookup("r1") == Served("chat", "a")
    index.served("r1", "chat", "b")  # a retry logged later wins
    assert index.lookup("r1") == Served("chat", "b")


def test_empty_request_id_is_not_remembered() -> None:
    index = RequestIndex()
    assert index.served("", "chat", "a") is None
    assert index.lookup("") is None


def test_capacity_evicts_the_oldest_first() -> None:
    index = RequestIndex(capacity=3)
    for rid in ("r1", "r2", "r3"):
        index.served(rid, "chat", "a")
    index.served("r1", "chat", "a")  # seen again: now the newest
    index.served("r4", "chat", "b")
    assert index.lookup("r2") is None
    assert [index.lookup(r) for r in ("r1", "r3", "r4")] == [Served("chat", "a"), Served("chat", "a"),
                                                             Served("chat", "b")]
    index.served("r5", "chat", "b")
    assert index.lookup("r3") is None and index.lookup("r1") is not None


def test_waiting_feedback_is_returned_by_a_later_served() -> None:
    index = RequestIndex(wait_seconds=30)
    index.wait("r1", 0.9, now=100.0)
    assert index.lookup("r1") is None
    assert index.served("r1", "chat", "a") == 0.9
    assert index.lookup("r1") == Served("chat", "a")
    assert index.served("r1", "chat", "a") is None  # handed over once
    assert index.served("r2", "chat", "a") is None
    assert index.expired == 0


def test_waiting_feedback_expires_after_wait_seconds() -> None:
    index = RequestIndex(wait_seconds=30)
    index.wait("old", 0.1, now=100.0)
    index.wait("young", 0.2, now=120.0)
    index.expire(now=129.9)
    assert index.expired == 0
    index.expire(now=130.0)  # "old" has waited exactly 30 s
    assert index.expired == 1
    assert index.served("old", "chat", "a") is None
    assert index.served("young", "chat", "a") == 0.2


def test_wait_itself_expires_stale_feedback() -> None:
    index = RequestIndex(wait_seconds=10)
    index.wait("r1", 0.5, now=0.0)
    index.wait("r2", 0.6, now=11.0)
    assert index.expired == 1
    assert index.served("r1", "chat", "a") is None
    assert index.served("r2", "chat", "a") == 0.6


def test_waiting_feedback_is_bounded_by_capacity() -> None:
    index = RequestIndex(capacity=2, wait_seconds=1000)
    for i, rid in enumerate(("r1", "r2", "r3")):
        index.wait(rid, i / 10, now=float(i))
    assert index.expired == 1
    assert index.served("r1", "chat", "a") is None
    assert index.served("r2", "chat", "a") == 0.1
    assert index.served("r3", "chat", "a") == 0.2


def test_rewaited_feedback_does_not_shield_older_feedback_from_expiry() -> None:
    index = RequestIndex(wait_seconds=30)
    index.wait("a", 0.1, now=0.0)
    index.wait("b", 0.2, now=10.0)
    index.wait("a", 0.3, now=20.0)  # a second rating for "a" before its log entry arrives
    index.expire(now=45.0)  # "b" has waited 35 s > 30 s
    assert index.served("b", "chat", "x") is None
