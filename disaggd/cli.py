"""The `disaggd` command line: run | check | reload | status | restart | stop.

Heavy modules (the daemon, Quart, aiohttp, pydantic models) are imported inside
the subcommand that needs them, so `disaggd --help` stays fast.

Exit statuses follow sysexits.h, which systemd understands: 0 ok, 1 failure,
2 usage, 69 (EX_UNAVAILABLE) no daemon answering, 78 (EX_CONFIG) bad topology.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggd import __version__

if TYPE_CHECKING:
    from disaggd.topology import Topology

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_CONFIG = 78

ENV_CONFIG = "DISAGGD_CONFIG"


def _default_config() -> Path:
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    from disaggd.topology import DEFAULT_CONFIG_PATH

    return DEFAULT_CONFIG_PATH


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="disaggd",
        description="Supervise vLLM prefill/decode instances and serve their "
        "OpenAI-compatible disaggregated-prefill proxy.",
    )
    parser.add_argument("--version", action="version", version=f"disaggd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help=f"topology file (default: ${ENV_CONFIG} or /etc/disaggd/disaggd.toml)",
        )

    def with_socket(p: argparse.ArgumentParser) -> None:
        with_config(p)
        p.add_argument(
            "--socket", type=Path, default=None, help="control socket (default: from the topology)"
        )
        p.add_argument("--timeout", type=float, default=None, help="seconds to wait for a reply")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(p)
    p.add_argument(
        "--log-format",
        choices=["auto", "console", "json", "logfmt", "journal"],
        default=None,
        help="override [daemon].log_format",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)

    p = sub.add_parser("check", help="validate a topology and print each instance's argv and env")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("reload", help="re-read the topology and apply what changed")
    with_socket(p)

    p = sub.add_parser("status", help="show every instance's state")
    with_socket(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("restart", help="restart one instance (also clears FATAL)")
    with_socket(p)
    p.add_argument("name", help="instance name")

    p = sub.add_parser("stop", help="drain and stop the daemon")
    with_socket(p)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `disaggd` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    handler = {
        "run": _cmd_run,
        "check": _cmd_check,
        "reload": _cmd_control,
        "status": _cmd_control,
        "restart": _cmd_control,
        "stop": _cmd_control,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def _load(path: Path | None) -> Topology | int:
    """The topology, or EX_CONFIG after printing every problem to stderr."""
    from disaggd.topology import ConfigError, load_config

    try:
        return load_config(path or _default_config())
    except ConfigError as exc:
        print(f"disaggd: invalid topology ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem.render(exc.path)}", file=sys.stderr)
        return EX_CONFIG


def _cmd_check(args: argparse.Namespace) -> int:
    from disaggd.topology.spec import build_spec

    topo = _load(args.config)
    if isinstance(topo, int):
        return topo
    rows: list[dict[str, Any]] = []
    for inst in topo.instances:
        row: dict[str, Any] = {"name": inst.name, "role": inst.role.value, "url": inst.base_url}
        if inst.spawned:
            spec = build_spec(topo, inst)
            row.update(argv=list(spec.argv), env=dict(spec.env), shell=spec.shell())
        else:
            row["remote"] = True
        rows.append(row)
    if args.json:
        doc = {
            "config": str(args.config or _default_config()),
            "model": topo.model.public_name,
            "connector": topo.kv_transfer.connector,
            "handoff": topo.connector.handoff.value,
            "proxy": f"http://{topo.proxy.host}:{topo.proxy.port}",
            "instances": rows,
        }
        print(json.dumps(doc, indent=2))
        return EX_OK
    print(
        f"# topology OK: model {topo.model.public_name}, connector "
        f"{topo.kv_transfer.connector} (handoff: {topo.connector.handoff.value}), "
        f"proxy http://{topo.proxy.host}:{topo.proxy.port}"
    )
    for row in rows:
        print(f"\n# {row['name']} ({row['role']}, {row['url']})")
        if row.get("remote"):
            print("# remote instance: routed to and health-checked, not spawned")
            continue
        print(row["shell"])
    return EX_OK


def _cmd_run(args: argparse.Namespace) -> int:
    topo = _load(args.config)
    if isinstance(topo, int):
        return topo
    from disaggd.daemon.core import run_daemon

    return run_daemon(
        args.config or _default_config(),
        topo,
        log_format=args.log_format,
        log_level=args.log_level,
    )


def _cmd_control(args: argparse.Namespace) -> int:
    from disaggd.daemon.control import ControlUnavailable, request, resolve_socket

    socket_path = resolve_socket(args.socket, args.config or _default_config())
    payload: dict[str, Any] = {"command": args.command}
    if args.command == "restart":
        payload["name"] = args.name
    timeout = args.timeout
    if timeout is None:
        # A reload or restart waits for instances to load a model.
        timeout = 3600.0 if args.command in ("reload", "restart") else 30.0
    try:
        reply = request(socket_path, payload, timeout=timeout)
    except ControlUnavailable as exc:
        print(f"disaggd: {exc}", file=sys.stderr)
        if args.socket is None:
            unreadable = _unreadable(args.config or _default_config())
            if unreadable:
                # The socket path comes from the file: say why the default was tried.
                print(
                    f"disaggd: {unreadable}; the default socket was tried instead "
                    "(fix the file, or give --socket PATH)",
                    file=sys.stderr,
                )
        return EX_UNAVAILABLE
    from disaggd.daemon.status import render_reply

    text, status = render_reply(args.command, reply, as_json=getattr(args, "json", False))
    stream = sys.stdout if status == EX_OK else sys.stderr
    if text:
        print(text, file=stream)
    return status


def _unreadable(config_path: Path) -> str | None:
    """Why `config_path` cannot be read as TOML (so no control socket path), or None."""
    from disaggd._compat import tomllib

    try:
        tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
    except OSError as exc:
        return f"cannot read {config_path}: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{config_path} is not valid TOML: {exc}"
    return None
