"""The operator's tools against a real Envoy: readiness, the status table, token-guarded drains, JSON logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from controlplane.table import COLUMNS

from .harness import ROOT, ControlPlane, MockBackend, http_json, spread, wait_for

pytestmark = pytest.mark.e2e

TOKEN = "operator-token-0123456789abcdef"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "LLM_LB_API_TOKEN"}
    return subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**environ, **(env or {})})


def test_status_table_tokens_readiness_and_json_logs(tmp_path):
    a, b = MockBackend("a"), MockBackend("b", args=["--latency-ms", "20"])
    cp = ControlPlane(tmp_path, None, env={"LLM_LB_API_TOKEN": TOKEN}, start=False)
    doc = cp.document({"chat": {"match": {"prefix": "/v1/"}, "backends": {
        "a": {"url": a.url, "weight": 3}, "b": {"url": b.url, "weight": 1}}}})
    doc["controlplane"]["api"]["token"] = "${LLM_LB_API_TOKEN}"
    cp.write_config(text=yaml.safe_dump(doc))
    cp.args[3:3] = ["--log-format", "json"]  # a global option, before the subcommand
    try:
        cp.start()
        code, ready = http_json("GET", f"{cp.api}/readyz")
        assert code == 200 and ready["ready"] and ready["connected"] == 1 and ready["in_sync"] == 1, ready

        counts, statuses = spread(cp.listener, 40, clients=4)
        assert statuses == {200: 40}
        wait_for(lambda: all(b["envoy_state"] == "healthy"
                             for b in http_json("GET", f"{cp.api}/v1/pools/chat")[1]["backends"].values()),
                 what="Envoy's view of both backends")

        table = cli("status", "--api", cp.api)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        header = next(line for line in lines if line.startswith("POOL"))
        assert header.split() == list(COLUMNS)
        rows = {line.split()[1]: line.split() for line in lines if line.startswith("chat ")}
        assert set(rows) == {"a", "b"}
        assert rows["a"][2] == "healthy" and rows["a"][3] == "3" and rows["b"][3] == "1"
        share = {name: int(row[4].rstrip("%")) for name, row in rows.items()}
        assert share == {n: round(100 * counts[n] / 40) for n in ("a", "b")}, (share, counts)
        as_json = cli("status", "--json", "--api", cp.api)
        assert json.loads(as_json.stdout)["pools"]["chat"]["backends"].keys() == {"a", "b"}
        assert TOKEN not in table.stdout + as_json.stdout

        refused = cli("drain", "chat", "a", "--api", cp.api)
        assert refused.returncode == 1 and "LLM_LB_API_TOKEN" in refused.stderr
        wrong = cli("drain", "chat", "a", "--api", cp.api, env={"LLM_LB_API_TOKEN": "not-the-token-0123456789"})
        assert wrong.returncode == 1
        assert cp.status()["pools"]["chat"]["backends"]["a"]["draining"] is False
        drained = cli("drain", "chat", "a", "--api", cp.api, env={"LLM_LB_API_TOKEN": TOKEN})
        assert drained.returncode == 0, drained.stderr
        wait_for(lambda: "draining" in cli("status", "--api", cp.api).stdout, what="the table to show the drain")

        events = [json.loads(line) for line in cp.log_text().splitlines() if line.startswith("{")]
        assert events and all({"time", "level", "event", "logger"} <= set(e) for e in events)
        assert any(e.get("pool") == "chat" and e.get("backend") == "a" and "draining" in e["event"] for e in events)
        assert any(e.get("node") for e in events), "Envoy's connection is logged with its node id"
        assert TOKEN not in cp.log_text()
    finally:
        cp.stop()
        a.stop()
        b.stop()
