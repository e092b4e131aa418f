"""The persisted operator state: round trip, and a damaged file kept aside rather than lost."""

from __future__ import annotations

from controlplane import statefile


def test_round_trip(tmp_path):
    path = tmp_path / "state.json"
    statefile.save(path, statefile.PersistedState(drained={("chat", "a"), ("rag", "r1")}))
    assert statefile.load(path).drained == {("chat", "a"), ("rag", "r1")}
    assert not (tmp_path / "state.json.tmp").exists()


def test_missing_file_is_empty_state(tmp_path):
    assert statefile.load(tmp_path / "none.json").drained == set()


def test_corrupt_file_is_kept_aside(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert statefile.load(path).drained == set()
    kept = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{not json"
    assert "unreadable" in caplog.text
