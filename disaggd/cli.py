"""The `disaggd` command line.

Daemon: run | check | reload | status | shutdown. Instances (supervisorctl's
verbs): start | stop | restart | drain | undrain NAME..., logs NAME [-n N] [-f].
`disaggd stop` without a name stops the daemon, as it always did (with a note).

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
from collections.abc import Callable, Sequence
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
#: A shell's status for a command ended by SIGPIPE (128 + 13).
EX_SIGPIPE = 141

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

    p = sub.add_parser("status", help="show every instance's state (or the named ones)")
    with_socket(p)
    p.add_argument("names", nargs="*", metavar="NAME", help="instance names (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("restart", help="restart one instance (also clears FATAL)")
    with_socket(p)
    p.add_argument("name", help="instance name")

    for verb, text in _INSTANCE_VERBS.items():
        p = sub.add_parser(verb, help=text)
        with_socket(p)
        p.add_argument("names", nargs="+" if verb != "stop" else "*", metavar="NAME")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("logs", help="an instance's recent output; -f follows it")
    with_socket(p)
    p.add_argument("name", help="instance name")
    p.add_argument("-n", "--lines", type=_count, default=10, help="recent lines (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="print new lines until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser("shutdown", help="drain and stop the daemon and every instance")
    with_socket(p)

    p = sub.add_parser("export", help="render the topology for llm-d or Kubernetes")
    _add_export(p, with_config)

    return parser


def _add_export(
    p: argparse.ArgumentParser, with_config: Callable[[argparse.ArgumentParser], None]
) -> None:
    """`disaggd export llm-d|k8s -c FILE [-o OUT]` (k8s: ``--namespace``, ``--image``)."""
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    for target, text in (
        ("llm-d", "llm-d's endpoints file (its endpoint picker's file discovery)"),
        ("k8s", "Kubernetes manifests: a Deployment and a Service per instance"),
    ):
        t = targets.add_parser(target, help=text)
        with_config(t)
        t.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
        if target == "k8s":
            t.add_argument("--namespace", default=None, help="metadata.namespace")
            t.add_argument("--image", default=None, help="container image (vLLM's by default)")


_INSTANCE_VERBS = {
    "start": "start stopped (or FATAL) instances and wait until they are ready",
    "stop": "drain, then stop instances (they stay STOPPED); with no NAME: the daemon",
    "drain": "take instances out of rotation and let their requests finish (routing only)",
    "undrain": "put drained instances back into rotation",
}

#: What `disaggd stop` without a name says on stderr (scripts read stdout and the status).
STOP_NOTE = (
    "disaggd: note: `disaggd stop` without a name stops the daemon; "
    "`disaggd shutdown` says so, `disaggd stop NAME` stops one instance"
)


def _count(text: str) -> int:
    """argparse type: a whole number of lines, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


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
        "start": _cmd_control,
        "stop": _cmd_control,
        "drain": _cmd_control,
        "undrain": _cmd_control,
        "shutdown": _cmd_control,
        "logs": _cmd_logs,
        "export": _cmd_export,
    }[args.command]
    try:
        status = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `disaggd logs NAME | head`: the reader is gone; end quietly like `cat` does.
        # Point stdout at /dev/null so that flushing it at exit raises nothing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_SIGPIPE
    return status


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


def _cmd_export(args: argparse.Namespace) -> int:
    """`disaggd export llm-d|k8s -c FILE [-o OUT]`: 0, or 78 when it cannot be rendered."""
    from disaggd.export import ExportError, k8s, llmd
    from disaggd.export.atomic import write_atomic

    topo = _load(args.config)
    if isinstance(topo, int):
        return topo
    source = str(args.config or _default_config())
    try:
        if args.target == "k8s":
            image = args.image or k8s.DEFAULT_IMAGE
            text = k8s.render(topo, namespace=args.namespace, image=image, source=source)
        else:
            text = llmd.render(topo, source=source)
    except ExportError as exc:
        print(f"disaggd: cannot export to {args.target}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem.render(source)}", file=sys.stderr)
        return EX_CONFIG
    if args.output is None:
        sys.stdout.write(text)
        return EX_OK
    try:
        write_atomic(args.output, text)
    except OSError as exc:
        print(f"disaggd: cannot write {args.output}: {exc}", file=sys.stderr)
        return EX_FAILURE
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


#: Commands that may wait for a model to load, or for requests to drain (seconds).
_LONG = ("reload", "restart", "start", "stop", "drain", "undrain")


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {"command": args.command}
    if args.command == "restart":
        payload["name"] = args.name
    names = getattr(args, "names", None)
    if names:
        payload["names"] = list(names)
    elif args.command == "stop":
        print(STOP_NOTE, file=sys.stderr)
    return payload


def _unavailable(args: argparse.Namespace, exc: Exception) -> int:
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


def _cmd_control(args: argparse.Namespace) -> int:
    from disaggd.daemon.control import ControlUnavailable, request, resolve_socket

    socket_path = resolve_socket(args.socket, args.config or _default_config())
    payload = _payload(args)
    timeout = args.timeout
    if timeout is None:
        # A reload, start or stop waits for instances to load a model or to drain.
        timeout = 3600.0 if args.command in _LONG else 30.0
    try:
        reply = request(socket_path, payload, timeout=timeout)
    except ControlUnavailable as exc:
        return _unavailable(args, exc)
    from disaggd.daemon.status import render_reply

    as_json = getattr(args, "json", False)
    if "results" in reply and not as_json:
        # One line per instance: what was done on stdout, what failed on stderr.
        for result in reply["results"]:
            line = f"{result.get('name')}: {result.get('message')}"
            print(line, file=sys.stdout if result.get("ok") else sys.stderr)
        return EX_OK if reply.get("ok") else EX_FAILURE
    text, status = render_reply(args.command, reply, as_json=as_json)
    stream = sys.stdout if status == EX_OK else sys.stderr
    if text:
        print(text, file=stream)
    return status


def _cmd_logs(args: argparse.Namespace) -> int:
    """`disaggd logs NAME [-n N] [-f]`: print lines as ``TIME STREAM LINE``.

    Exit status 0; 1 for an unknown instance or when the stream ends unasked.
    """
    from disaggd.daemon.control import ControlUnavailable, resolve_socket, stream
    from disaggd.daemon.status import render_line

    socket_path = resolve_socket(args.socket, args.config or _default_config())
    payload = {"command": "logs", "name": args.name, "lines": args.lines, "follow": args.follow}
    replies = stream(socket_path, payload, timeout=args.timeout or 30.0)
    try:
        first = next(replies)
    except ControlUnavailable as exc:
        return _unavailable(args, exc)
    if not first.get("ok"):
        print(f"disaggd logs: {first.get('error', 'failed')}", file=sys.stderr)
        return EX_FAILURE
    for line in first.get("lines", []):
        print(json.dumps(line) if args.json else render_line(line), flush=True)
    if not args.follow:
        return EX_OK
    try:
        for obj in replies:
            if args.json:
                print(json.dumps(obj), flush=True)
            elif "line" in obj:
                print(render_line(obj), flush=True)
            elif "dropped" in obj:
                print(
                    f"disaggd logs: {obj['dropped']} line(s) dropped: this reader fell behind",
                    file=sys.stderr,
                )
            if "end" in obj:
                print(f"disaggd logs: {obj['end']}", file=sys.stderr)
                return EX_OK
    finally:
        replies.close()
    print("disaggd logs: the daemon closed the connection", file=sys.stderr)
    return EX_FAILURE


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
