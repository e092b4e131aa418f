"""The live page in headless Chromium against a running demo: real Envoy, control plane and mock backends.

The page (controlplane/web/index.html, served at the API's `/`) fetches /v1/status and /v1/pools every
2 s. Chromium's --virtual-time-budget runs the page's clock ahead but holds it while a fetch is pending,
so --dump-dom returns the DOM after several refreshes; should a dump come back without the rows, the test
dumps again until a deadline. The screenshot lands in the test's tmp_path and in tests/output/page.png.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from .harness import ControlPlane, MockBackend, chat_body, http_json, spread, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
OUTPUT = Path(__file__).resolve().parent / "output"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIRTUAL_TIME_MS = 8000
RUN_TIMEOUT = 60.0
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium_binary() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: CI must install Debian's chromium (see .ci/run)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); with CI set this test fails instead")


def run_chromium(binary: str, tmp: Path, url: str, *args: str) -> str:
    """Run headless Chromium once with a fresh profile; its stdout. Stopped by its process group on timeout."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helper processes, all in the group it leads
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {RUN_TIMEOUT}s: {' '.join(cmd)}") from None
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, **attrs: str) -> Node | None:
        return next((n for n in self.walk() if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())),
                    None)


class Dom(HTMLParser):
    """The dumped DOM as a small tree (html.parser: no third-party parser needed)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self._stack = [self.root]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self._stack[-1].children.append(node)
        if tag not in VOID:
            self._stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, 0, -1):
            if self._stack[i].tag == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self._stack[-1].children.append(data)

    def backend_rows(self) -> dict[tuple[str, str], Node]:
        table = self.root.find(id="backends")
        assert table is not None, "the page has no table#backends"
        return {(n.attrs["data-pool"], n.attrs["data-backend"]): n
                for n in table.walk() if n.tag == "tr" and "data-pool" in n.attrs and "data-backend" in n.attrs}


def cell(row: Node, name: str) -> str:
    found = row.find(data_field=name)
    assert found is not None, f"row {row.attrs} has no data-field={name!r} cell"
    return found.text().strip()


def shown_weight(weight: Any) -> str:
    return "—" if weight is None else str(weight)


def api_view(cp: ControlPlane, pools: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per backend, what the page must show, as the API reports it (never hard-coded here)."""
    out = {}
    for pool in pools:
        code, body = http_json("GET", f"{cp.api}/v1/pools/{pool}")
        assert code == 200, body
        out.update({(pool, name): {"weight": b["weight"], "envoy_state": b["envoy_state"]}
                    for name, b in body["backends"].items()})
    return out


def check_rows(dom: Dom, view: dict[tuple[str, str], dict[str, Any]], drained: frozenset[tuple[str, str]]) -> None:
    rows = dom.backend_rows()
    for key, api in sorted(view.items()):
        assert cell(rows[key], "weight") == shown_weight(api["weight"]), (key, api)
        state = rows[key].find(data_field="envoy_state")
        pill = state and next((n for n in state.walk() if "data-state" in n.attrs), None)
        assert pill is not None and pill.attrs["data-state"] == api["envoy_state"], (key, api)
        action = "undrain" if key in drained else "drain"
        assert rows[key].find(data_action=action) is not None, f"{key} has no {action} button"


def load_page(binary: str, tmp: Path, cp: ControlPlane, expected: set[tuple[str, str]],
              drained: frozenset[tuple[str, str]] = frozenset(),
              deadline_s: float = 45.0) -> tuple[Dom, dict[tuple[str, str], dict[str, Any]]]:
    """Dump the page's DOM until it shows a row for every expected backend (with an Undrain button exactly
    for the `drained` ones); the DOM and the API's view read around the same dump (equal before and
    after it, so the page cannot have raced a change)."""
    deadline = time.monotonic() + deadline_s
    attempts = []
    while True:
        pools = sorted({p for p, _ in expected})
        before = api_view(cp, pools)
        dom = Dom(run_chromium(binary, tmp, f"{cp.api}/", "--dump-dom"))
        after = api_view(cp, pools)
        rows = dom.backend_rows()
        undrain = {key for key, row in rows.items() if row.find(data_action="undrain") is not None}
        attempts.append(f"rows {sorted(rows)}, undrain {sorted(undrain)}, API stable {before == after}")
        if expected <= set(rows) and undrain == drained and before == after:
            print(f"the page showed the expected rows after {len(attempts)} dump(s)")
            return dom, after
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed every backend {sorted(expected)} (draining: {sorted(drained)}); "
                                 f"per attempt: {attempts}")
        time.sleep(1)


def envoy_sees_all(cp: ControlPlane, expected: set[tuple[str, str]]) -> None:
    """Wait until the API reports Envoy's own view: every backend healthy (read from its admin every 2 s)."""
    pools = sorted({p for p, _ in expected})
    wait_for(lambda: all(v["envoy_state"] == "healthy" for v in api_view(cp, pools).values()),
             timeout=20, what="the API to report every backend healthy in Envoy's view")


def test_live_page_shows_every_backend_with_its_weight(tmp_path):
    binary = chromium_binary()
    a, b = MockBackend("a"), MockBackend("b")
    cp = None
    try:
        pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "weighted", "timeout": "10s",
                          "backends": {a.name: {"url": a.url, "weight": 3}, b.name: {"url": b.url, "weight": 1}}}}
        cp = ControlPlane(tmp_path, pools)
        counts, statuses = spread(cp.listener, 40, clients=4)
        assert statuses == Counter({200: 40}), statuses

        code, page = http_json("GET", f"{cp.api}/")
        assert code == 200 and "<table id=\"backends\"" in str(page), page
        expected = {(pool, name) for pool, p in pools.items() for name in p["backends"]}
        envoy_sees_all(cp, expected)

        started = time.monotonic()
        dom, view = load_page(binary, tmp_path, cp, expected)
        check_rows(dom, view, frozenset())
        status = cp.status()
        version = dom.root.find(id="config-version")
        assert version is not None and version.text().strip() == status["config"]["version"]
        banner = dom.root.find(id="banner")
        assert banner is not None and "hidden" in banner.attrs, f"the page shows an error: {banner and banner.text()}"
        dump_seconds = time.monotonic() - started

        # A drained backend: the page says so and offers Undrain, with the weight the API still reports.
        code, body = http_json("POST", f"{cp.api}/v1/pools/chat/backends/{b.name}/drain", {})
        assert code == 200, body
        drained = frozenset({("chat", b.name)})
        dom, view = load_page(binary, tmp_path, cp, expected, drained)
        check_rows(dom, view, drained)
        code, body = http_json("POST", f"{cp.api}/v1/pools/chat/backends/{b.name}/undrain", {})
        assert code == 200, body
        envoy_sees_all(cp, expected)  # so the screenshot shows both backends in rotation
        load_page(binary, tmp_path, cp, expected)

        shot = tmp_path / "page.png"
        run_chromium(binary, tmp_path, f"{cp.api}/", f"--screenshot={shot}", "--window-size=1280,900")
        assert shot.exists(), "chromium wrote no screenshot"
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 8 * 1024, f"{len(data)} bytes"
        OUTPUT.mkdir(exist_ok=True)
        shutil.copyfile(shot, OUTPUT / "page.png")
        print(f"page rows in {dump_seconds:.1f}s; screenshot {len(data)} bytes at {OUTPUT / 'page.png'}")
    finally:
        if cp is not None:
            cp.stop()
        a.stop()
        b.stop()


def test_live_page_lists_clients_by_name_never_by_key(tmp_path):
    binary = chromium_binary()
    import yaml

    key = "page-client-key-0123456789abcdef"
    a = MockBackend("a")
    cp = ControlPlane(tmp_path, None, env={"PAGE_CLIENT_KEY": key}, start=False)
    try:
        doc = cp.document({"chat": {"match": {"prefix": "/v1/"}, "backends": {"a": {"url": a.url}}}})
        doc["clients"] = {"web-app": {"key": "${PAGE_CLIENT_KEY}", "limits": {"requests_per_minute": 600}}}
        cp.write_config(text=yaml.safe_dump(doc, sort_keys=False))
        cp.start()
        import http.client

        for auth in (f"Bearer {key}", f"Bearer {key}", "Bearer wrong-key-0123456789abcdef"):
            conn = http.client.HTTPConnection(cp.listener, timeout=10)
            conn.request("POST", "/v1/chat/completions", chat_body(),
                         {"content-type": "application/json", "authorization": auth})
            conn.getresponse().read()
            conn.close()
        wait_for(lambda: cp.status()["clients"]["web-app"]["requests"] == 2, what="the client's requests counted")
        deadline = time.monotonic() + 30
        while True:
            html = run_chromium(binary, tmp_path, f"{cp.api}/", "--dump-dom")
            row = Dom(html).root.find(data_client="web-app")
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert row is not None, "the page has no row for client web-app"
        cells = [n.text().strip() for n in row.walk() if n.tag == "td"]
        assert cells[0] == "web-app" and cells[1] == "2" and cells[4] == "600 / —", cells
        assert key not in html
    finally:
        cp.stop()
        a.stop()


def rollout_view(cp: ControlPlane, pool: str) -> dict[str, Any]:
    """What the rollout card must show, as /v1/status reports it: phase, step, candidate and the gates."""
    report = cp.status().get("rollouts", {}).get(pool)
    assert isinstance(report, dict), f"/v1/status reports no rollout for {pool!r}"
    return {"phase": report["phase"], "step": report["step"], "steps": report["steps"],
            "candidate": report["candidate"], "gates": [(g["name"], g["status"]) for g in report["gates"]]}


def load_rollout_card(binary: str, tmp: Path, cp: ControlPlane, pool: str, phase: str,
                      deadline_s: float = 20.0) -> tuple[Dom, Node, dict[str, Any]]:
    """Dump the page until it shows `pool`'s rollout card in `phase`, with the API's report the same before
    and after the dump (so the card cannot have raced a gate's change); the DOM, the card and that report."""
    deadline = time.monotonic() + deadline_s
    attempts = []
    while True:
        before = rollout_view(cp, pool)
        dom = Dom(run_chromium(binary, tmp, f"{cp.api}/", "--dump-dom"))
        after = rollout_view(cp, pool)
        card = dom.root.find(data_rollout=pool)
        title = card and next((n for n in card.walk() if n.tag == "h3"), None)
        pill = title and title.find(data_phase=phase)
        attempts.append(f"card {card is not None}, phase pill {pill is not None}, API {after['phase']}, "
                        f"stable {before == after}")
        if card is not None and pill is not None and before == after:
            return dom, card, after
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {pool}'s rollout {phase}; per attempt: {attempts}")
        time.sleep(1)


def test_live_page_shows_a_canary_rollout_and_its_pause(tmp_path):
    binary = chromium_binary()
    a, c = MockBackend("a"), MockBackend("c")
    cp = None
    try:
        pools = {"chat": {"match": {"prefix": "/v1/"}, "strategy": "weighted", "timeout": "10s",
                          "backends": {a.name: {"url": a.url}, c.name: {"url": c.url}},
                          "rollout": {"candidate": c.name, "steps": [10, 50, 100], "step_duration": "600s",
                                      "max_step_duration": "1200s", "min_requests": 10}}}
        cp = ControlPlane(tmp_path, pools)
        counts, statuses = spread(cp.listener, 20, clients=4)
        assert statuses == Counter({200: 20}), statuses
        wait_for(lambda: rollout_view(cp, "chat")["gates"], timeout=15, what="the rollout's first gate evaluation")

        dom, card, report = load_rollout_card(binary, tmp_path, cp, "chat", "running")
        section = dom.root.find(id="rollouts-section")
        assert section is not None and "hidden" not in section.attrs, "the rollouts section is hidden"
        assert report["phase"] == "running" and report["step"] == 1 and report["steps"] == [10, 50, 100], report
        step = card.find(data_field="step")
        assert step is not None and step.text().strip().startswith("step 1 of 3"), step and step.text()
        candidate = card.find(data_field="candidate")
        assert candidate is not None and candidate.text().strip() == c.name, candidate and candidate.text()
        shown = [(n.attrs["data-gate"], n.attrs.get("data-status")) for n in card.walk() if "data-gate" in n.attrs]
        assert report["gates"] and shown == report["gates"], (shown, report["gates"])
        for name, status in shown:  # each gate's pill says its status
            gate = card.find(data_gate=name)
            pill = gate and next((n for n in gate.walk() if "pill" in n.attrs.get("class", "").split()), None)
            assert pill is not None and pill.text().strip() == status, (name, status, pill and pill.text())

        code, body = http_json("POST", f"{cp.api}/v1/rollouts/chat/pause", {})
        assert code == 200 and body["phase"] == "paused", body
        dom, card, report = load_rollout_card(binary, tmp_path, cp, "chat", "paused")
        assert report["phase"] == "paused", report
        pill = next(n for n in card.walk() if n.tag == "h3").find(data_phase="paused")
        assert pill is not None and pill.text().strip() == "paused" and "warn" in pill.attrs["class"].split(), pill
        assert "paused" in card.text()
    finally:
        if cp is not None:
            cp.stop()
        a.stop()
        c.stop()
