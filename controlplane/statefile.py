"""Operator actions that must survive a control-plane restart (drains), in one JSON file.

Written atomically (temp file + rename), so a crash leaves the old file or the
new one, never half of either.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("controlplane.state")

VERSION = 1


@dataclass
class PersistedState:
    drained: set[tuple[str, str]] = field(default_factory=set)

    def to_json(self) -> dict[str, object]:
        return {
            "version": VERSION,
            "drained": [{"pool": p, "backend": b} for p, b in sorted(self.drained)],
        }


def load(path: Path) -> PersistedState:
    if not path.exists():
        return PersistedState()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        drained = {(str(d["pool"]), str(d["backend"])) for d in data.get("drained", [])}
        return PersistedState(drained=drained)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.error("state file %s is unreadable (%s); %s and started empty", path, exc, keep_aside(path))
        return PersistedState()


def keep_aside(path: Path) -> str:
    """Move an unreadable file out of the way (kept for a human to look at); says where it went."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        path.replace(aside)
    except OSError as exc:
        return f"left it in place ({exc.strerror or exc})"
    return f"kept it as {aside}"


def save(path: Path, state: PersistedState) -> None:
    atomic_write(path, json.dumps(state.to_json(), indent=2) + "\n")


def atomic_write(path: Path, text: str, private: bool = False) -> Path:
    """`private`: readable by the owner only (a file that holds a token), from the first byte written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    if private:
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode otherwise
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path
