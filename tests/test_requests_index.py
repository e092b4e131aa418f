"""Which backend served which request, and feedback that arrives before the access log entry."""

from __future__ import annotations

import pytest

from controlplane.telemetry.requests import MAX_REQUEST_ID_CHARS, AlreadyRatedError, RequestIndex, Served


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
    assert index.lookup("r1") == Served("chat", "a", rated=True)  # the waiting feedback was its rating
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


# -- bounded in bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "request_id",
    [pytest.param("x" * (MAX_REQUEST_ID_CHARS + 1), id="too-long"), pytest.param("x" * 50_000, id="50-kb"),
     pytest.param("é" * 10, id="not-ascii")],
)
def test_ids_that_could_cost_memory_are_not_indexed_nor_waited_for(request_id: str) -> None:
    index = RequestIndex()
    assert index.served(request_id, "chat", "a") is None
    assert index.lookup(request_id) is None
    index.wait(request_id, 0.5, now=0.0)
    assert index.served(request_id, "chat", "a") is None and index.rate(request_id) is None
    assert not index._served and not index._pending


def test_the_longest_id_is_indexed() -> None:
    index = RequestIndex()
    rid = "u" * MAX_REQUEST_ID_CHARS
    index.served(rid, "chat", "a")
    assert index.lookup(rid) == Served("chat", "a")
    assert MAX_REQUEST_ID_CHARS >= 36, "Envoy's UUIDs fit"


# -- one rating per request ---------------------------------------------------------------------------------

def test_a_request_is_rated_once() -> None:
    index = RequestIndex()
    index.served("r1", "chat", "a")
    assert index.rate("r1") == Served("chat", "a")
    with pytest.raises(AlreadyRatedError):
        index.rate("r1")
    assert index.lookup("r1") == Served("chat", "a", rated=True)
    index.served("r1", "chat", "b")  # logged again: who served it changes, not that it was rated
    assert index.lookup("r1") == Served("chat", "b", rated=True)
    with pytest.raises(AlreadyRatedError):
        index.rate("r1")


def test_waiting_feedback_is_the_rating() -> None:
    index = RequestIndex()
    assert index.rate("r1") is None  # not seen yet: the caller waits
    index.wait("r1", 0.2, now=0.0)
    with pytest.raises(AlreadyRatedError):
        index.rate("r1")
    assert index.served("r1", "chat", "a") == 0.2
    with pytest.raises(AlreadyRatedError):
        index.rate("r1")


def test_rating_does_not_keep_a_request_from_aging_out() -> None:
    index = RequestIndex(capacity=2)
    index.served("r1", "chat", "a")
    index.served("r2", "chat", "a")
    index.rate("r1")
    index.served("r3", "chat", "a")
    assert index.lookup("r1") is None and index.rate("r1") is None  # aged out: no backend to rate any more


def test_rated_state_is_shared_not_kept_per_request() -> None:
    index = RequestIndex()
    for i in range(100):
        index.served(f"r{i}", "chat", "a")
        index.rate(f"r{i}")
    assert len({id(index.lookup(f"r{i}")) for i in range(100)}) == 1
