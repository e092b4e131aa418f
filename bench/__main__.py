"""`python -m bench [--part dataplane|reaction|scale|outcome ...] [--smoke]`: run, print a table, write JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .common import ROOT, Context, Missing, Row

PARTS = ("dataplane", "reaction", "scale", "outcome")


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    from controlplane.envoyproc import find_envoy

    envoy = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(),
            "envoy": (m.group(1) if (m := re.search(r"/(\d+\.\d+\.\d+)/", envoy)) else envoy[-60:]),
            "load_avg_at_start": os.getloadavg()}


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(rows: list[Row]) -> str:
    lines = ["| part | metric | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**missed**")
        lines.append(f"| {r.part} | {r.metric} | {fmt(r.value)} {r.unit} | {r.target or ''} | {met} | {r.note} |")
    return "\n".join(lines)


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def update_readme(result: dict[str, Any], rows: list[Row], name: str) -> None:
    """Replace the table between the README's markers with this run's, headed by when, what and where."""
    m = result["machine"]
    head = (f"Run {result['date']} at commit `{result['commit']}` on {m['cores']} cores ({m['cpu']}), "
            f"{m['memory_gb']} GB, Python {m['python']}, Envoy {m['envoy']}; load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}. JSON: `bench/results/{name}`.")
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + head + "\n\n" + table(rows) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--part", action="append", choices=PARTS, help="run only these parts (default: all)")
    p.add_argument("--smoke", action="store_true", help="each part for a few seconds: checks it runs, not speed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON goes")
    p.add_argument("--readme", action="store_true", help="also put the table in README.md's Performance section")
    args = p.parse_args(argv)
    # A `timeout` or Ctrl-C ends the run through `finally` blocks, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx = Context(smoke=args.smoke)
    meta = {"commit": commit(), "machine": machine()}  # before the load: a failure here loses no results
    rows: list[Row] = []
    failed: list[str] = []
    started = time.time()
    for part in args.part or PARTS:
        print(f"== {part}", flush=True)
        t = time.monotonic()
        try:
            got = importlib.import_module(f"bench.{part}").run(ctx)
        except Missing as exc:
            print(f"   cannot run {part}: {exc}", file=sys.stderr)
            failed.append(part)
            continue
        except Exception:  # noqa: BLE001 - report the part as failed, run the others
            traceback.print_exc()
            failed.append(part)
            continue
        rows += got
        print(f"   {len(got)} figures in {time.monotonic() - t:.0f}s", flush=True)
    result = {
        "date": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "commit": meta["commit"], "smoke": args.smoke, "seconds": round(time.time() - started, 1),
        "machine": meta["machine"], "failed_parts": failed, "rows": [r.as_dict() for r in rows],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{datetime.fromtimestamp(started, UTC):%Y%m%dT%H%M%SZ}-{result['commit']}{'-smoke' if args.smoke else ''}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nwritten: {out / name}")
    if args.readme and not failed:
        update_readme(result, rows, name)
        print("README.md: Performance table updated")
    empty = [part for part in args.part or PARTS if part not in failed and not any(r.part == part for r in rows)]
    blank = [f"{r.part}: {r.metric}" for r in rows if r.value is None or not math.isfinite(r.value)]
    if not failed:
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    else:
        print(f"logs of the failed parts: {ctx.workdir}", file=sys.stderr)
    if failed or empty or blank:
        print(f"parts that produced no figures: {', '.join(failed + empty) or '-'}; "
              f"figures without a number: {', '.join(blank) or '-'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
