"""Command line: validate, run, bootstrap, drain, undrain, rollout, status, simulate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import logs
from .config import Config, ConfigError, load_config

log = logging.getLogger("controlplane")


def _load_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''}):", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            failed += 1
            print(f"{path}: invalid ({len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''})", file=sys.stderr)
            for line in exc.errors:
                print(f"  {line}", file=sys.stderr)
            continue
        backends = sum(len(p.backends) for p in config.pools.values())
        print(f"{path}: ok ({len(config.pools)} pools, {backends} backends)")
    return 1 if failed else 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import bootstrap, write_bootstrap

    config = _load_or_exit(args.config)
    if args.token_placeholder:
        token = args.token_placeholder
    elif args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"{args.token_file}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            return 2
    elif config.controlplane.xds.token is not None:
        token = config.controlplane.xds.token.get_secret_value()
    else:
        print(f"{args.config}: controlplane.xds.token is not set: give --token-file (the running control "
              "plane's <state dir>/xds-token) or set the token in the config", file=sys.stderr)
        return 2
    content = json.dumps(
        bootstrap(config, args.node_id, xds_host=args.xds_host, admin_address=args.admin_address, token=token),
        indent=2,
    )
    if args.output == "-":
        print(content)
    else:
        write_bootstrap(Path(args.output), json.loads(content))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    return asyncio.run(_run(args, config))


async def _run(args: argparse.Namespace, config: Config) -> int:
    from .app import App
    from .demo.backends import start_mock_backends, stop_processes

    state_dir = Path(args.state_dir)
    mocks = start_mock_backends(config, state_dir) if args.mock_backends else []
    app = App(Path(args.config), config, state_dir=state_dir, run_envoy=not args.no_envoy, node_id=args.node_id,
              clock_offset_file=Path(args.clock_offset_file) if args.clock_offset_file else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except Exception as exc:
        log.error("cannot start: %s", exc)
        await app.stop()
        stop_processes(mocks)
        return 1
    listener = config.envoy.listener
    first_prefix = next(iter(config.pools.values())).match.prefix
    print(
        f"\nReady. Point apps at http://{listener}{first_prefix.rstrip('/')}  "
        f"(status: http://{config.controlplane.api}/v1/status)\n"
        f"  curl -s http://{listener}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f"    -d '{{\"model\": \"any\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}'\n"
        f"Edit {args.config} to retune the running system; Ctrl-C stops everything.\n",
        flush=True,
    )
    await stop.wait()
    log.info("stopping")
    await app.stop()
    stop_processes(mocks)
    return 0


def _api_base(args: argparse.Namespace) -> str:
    if args.api:
        return str(args.api).rstrip("/")
    if args.config:
        return f"http://{_load_or_exit(args.config).controlplane.api}"
    return "http://127.0.0.1:8088"


def _call_api(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None
              ) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": {"message": exc.reason}}
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the control plane at {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_drain(args: argparse.Namespace) -> int:
    action = "drain" if args.command == "drain" else "undrain"
    url = f"{_api_base(args)}/v1/pools/{args.pool}/backends/{args.backend}/{action}"
    token = os.environ.get(args.token_env) or None
    code, body = _call_api("POST", url, {"force": args.force} if action == "drain" else None, token)
    if code == 401:
        print(f"{action} refused: the API needs its token; set {args.token_env} (never pass it as an argument: "
              "other users can read a process's arguments)", file=sys.stderr)
        return 1
    if code != 200:
        print(f"{action} failed ({code}): {body.get('error', {}).get('message', body)}", file=sys.stderr)
        return 1
    state = "draining: no new requests; requests in flight finish" if body["draining"] else "back in rotation"
    print(f"{args.pool}/{args.backend}: {state}")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    base = f"{_api_base(args)}/v1/rollouts/{args.pool}"
    if args.action == "status":
        code, body = _call_api("GET", base)
    else:
        token = os.environ.get(args.token_env) or None
        code, body = _call_api("POST", f"{base}/{args.action}", {"full": True} if args.full else {}, token)
    if code == 401:
        print(f"rollout {args.action} refused: the API needs its token; set {args.token_env}", file=sys.stderr)
        return 1
    if code != 200:
        print(f"rollout {args.action} failed ({code}): {body.get('error', {}).get('message', body)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    from .table import rollout_text

    print(rollout_text(body))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    base = _api_base(args)
    code, body = _call_api("GET", f"{base}/v1/status")
    if args.json or code != 200:
        print(json.dumps(body, indent=2))
        return 0 if code == 200 else 1
    code, pools = _call_api("GET", f"{base}/v1/pools")
    if code != 200:
        print(json.dumps(pools, indent=2), file=sys.stderr)
        return 1
    from .table import status_table

    print(status_table(body, pools))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .scoring.simulator import main_simulate

    strategies = [s.strip() for s in args.strategies.split(",")] if args.strategies else None
    return main_simulate(args.config, args.workload, strategies, args.requests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description="xDS control plane for Envoy in front of LLM backends")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line (time, level, event, pool, backend, version where known)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check config files; exit 1 listing every error")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="serve xDS and supervise a local Envoy")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--no-envoy", action="store_true", help="serve external Envoys only (e.g. compose)")
    p.add_argument("--state-dir", default="state", help="bootstrap, Envoy log and state (default: ./state)")
    p.add_argument("--node-id", default="llm-lb-local")
    p.add_argument("--mock-backends", action="store_true", help="also start mock backends for loopback http backends")
    # FOR TESTS ONLY, hidden from --help: a file holding seconds (a float) added to the clock of budget
    # windows, spend hours and token minutes, read every 0.25 s, so a test can cross a window's end.
    p.add_argument("--clock-offset-file", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bootstrap", help="write the bootstrap for an Envoy that runs on its own")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    p.add_argument("--node-id", default="llm-lb-envoy")
    p.add_argument("--xds-host", default=None, help="where Envoy finds the control plane (default: controlplane.xds.address)")
    p.add_argument("--admin-address", default=None, help="admin bind address (default: envoy.admin.address)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="the xDS token (default: controlplane.xds.token), e.g. <state dir>/xds-token")
    p.add_argument("--token-placeholder", default=None, metavar="TEXT",
                   help="write TEXT where the token goes, to be replaced at start (compose)")
    p.set_defaults(func=cmd_bootstrap)

    for name, text in (("drain", "stop new requests to a backend; in-flight ones finish"),
                       ("undrain", "put a drained backend back in rotation")):
        p = sub.add_parser(name, help=text)
        p.add_argument("pool")
        p.add_argument("backend")
        if name == "drain":
            p.add_argument("--force", action="store_true", help="even if it is the pool's last backend in rotation")
        else:
            p.set_defaults(force=False)
        _add_api_args(p)
        p.add_argument("--token-env", default="LLM_LB_API_TOKEN", metavar="VAR",
                       help="environment variable holding the API token (default: LLM_LB_API_TOKEN)")
        p.set_defaults(func=cmd_drain)

    p = sub.add_parser("rollout", help="a pool's rollout: status, pause, resume, promote [--full], abort, retry")
    p.add_argument("action", choices=["status", "pause", "resume", "promote", "abort", "retry"])
    p.add_argument("pool")
    p.add_argument("--full", action="store_true", help="promote: the candidate at once, skipping the other steps")
    p.add_argument("--json", action="store_true", help="the whole report as JSON")
    _add_api_args(p)
    p.add_argument("--token-env", default="LLM_LB_API_TOKEN", metavar="VAR",
                   help="environment variable holding the API token (default: LLM_LB_API_TOKEN)")
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("simulate", help="compare strategies on simulated backends (the live scoring code)")
    p.add_argument("--workload", required=True, metavar="FILE")
    p.add_argument("--config", metavar="FILE", help="the operator config (optional if the workload embeds one)")
    p.add_argument("--strategies", help="comma-separated (default: every telemetry strategy)")
    p.add_argument("--requests", type=int, help="override the workload's request count")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("status", help="print each backend's state, weight, share, p95, quality and spend")
    p.add_argument("--json", action="store_true", help="the whole /v1/status document instead of the table")
    _add_api_args(p)
    p.set_defaults(func=cmd_status)
    return parser


def _add_api_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--api", help="control plane API base URL (default: from --config, else http://127.0.0.1:8088)")
    where.add_argument("--config", metavar="FILE", help="take the API address from this config file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
