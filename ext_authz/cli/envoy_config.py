"""`envoy-config`: print (or write) an Envoy bootstrap for a config."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..policy.config import Config
from .common import (
    CONFIG_HELP,
    EXIT_BAD_CONFIG,
    EXIT_OK,
    Commands,
    UsageError,
    count,
    load,
    seconds,
)


def _default_sidecar_address(config: Config) -> str:
    listen = config.grpc.listen
    if listen.startswith("unix:"):
        return listen
    host, _, port = listen.rpartition(":")
    # A wildcard listen address is not an address Envoy can dial.
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '::') else host}:{port}"


def write_atomically(path: str, text: str) -> None:
    """Write a whole file or none: a temporary file beside it, then renamed over it."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"--output {path}: folder {target.parent} does not exist")
    try:
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, target)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write ({exc.strerror})") from None


def _listener_tls(args: argparse.Namespace) -> Any:
    from ..render.options import ListenerTLS

    given = (args.listen_cert, args.listen_key, args.client_ca)
    if not any(given):
        return None
    if not all(given):
        raise ValueError("give --listen-cert, --listen-key and --client-ca together (callers"
                         " then present certificates the CA signed)")
    return ListenerTLS(args.listen_cert, args.listen_key, args.client_ca)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from ..policy.config import UpstreamAddress
    from ..render.bootstrap import build_bootstrap, render
    from ..render.options import HostPort, SidecarTLS, Timeouts, parse_sidecar

    # The generator needs no secret: unset ${VAR}s and secret files are never read.
    config = load(args.config, secrets=False)
    try:
        upstreams = {}
        for pair in args.upstream:
            name, sep, address = pair.partition("=")
            if not sep or not name:
                raise ValueError(f"--upstream {pair!r}: expected NAME=URL or NAME=HOST:PORT")
            try:
                upstreams[name] = UpstreamAddress.parse(address)
            except ValueError as exc:
                raise ValueError(f"--upstream {name}: {exc}") from None
        bootstrap = build_bootstrap(
            config,
            upstreams,
            listen=HostPort.parse(args.listen),
            admin=HostPort.parse(args.admin),
            sidecar=parse_sidecar(args.sidecar or _default_sidecar_address(config)),
            workers=args.workers,
            sidecar_tls=None if args.sidecar_ca is None else SidecarTLS(
                args.sidecar_ca, args.sidecar_cert, args.sidecar_key, args.sidecar_sni),
            upstream_ca=args.upstream_ca,
            timeouts=Timeouts(args.request_timeout, args.idle_timeout, args.receive_timeout),
            data_path=args.data_path,
            listener_tls=_listener_tls(args),
            node_id=args.node_id or _default_node_id(HostPort.parse(args.listen).port),
            max_connections=args.max_connections,
        )
    except ValueError as exc:
        print(f"envoy-config: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    text = render(bootstrap)
    if args.output:
        write_atomically(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _default_node_id(listen_port: int) -> str:
    """One id per Envoy: the host it is rendered on, and the port it listens on."""
    return f"mcp-ext-authz-{socket.gethostname()}-{listen_port}"


def add_parser(commands: Commands) -> None:
    """The `envoy-config` command's flags."""
    envoy = commands.add_parser(
        "envoy-config", help="print an Envoy bootstrap (YAML) for this config")
    envoy.add_argument("--config", required=True, metavar="FILE",
                       help=f"{CONFIG_HELP} (its secrets are not needed)")
    envoy.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                       help="where server NAME's MCP server listens: https://host[:port][/path],"
                            " http://..., or host:port (repeatable; overrides"
                            " servers.NAME.upstream)")
    envoy.add_argument("--upstream-ca", default=None, metavar="FILE",
                       help="CA bundle for https:// upstreams (default: the system's)")
    envoy.add_argument("--listen", default="0.0.0.0:10000",
                       help="Envoy's HTTP listener (default 0.0.0.0:10000)")
    envoy.add_argument("--admin", default="127.0.0.1:9901",
                       help="Envoy's admin listener (default 127.0.0.1:9901)")
    envoy.add_argument("--sidecar", default=None, metavar="ADDRESS",
                       help="where Envoy reaches the sidecar: host:port or unix:/path"
                            " (default: grpc.listen)")
    envoy.add_argument("--workers", type=count, default=1,
                       help="sidecar worker processes on consecutive ports (default 1)")
    envoy.add_argument("--request-timeout", type=seconds, default=0.0, metavar="SECONDS",
                       help="limit on a whole MCP request and its answer (default 0: none;"
                            " a tool call may run for minutes)")
    envoy.add_argument("--idle-timeout", type=seconds, default=0.0, metavar="SECONDS",
                       help="limit on an MCP stream sitting silent (default 0: none; a GET"
                            " stream may idle for hours)")
    envoy.add_argument("--receive-timeout", type=seconds, default=None, metavar="SECONDS",
                       help="limit on receiving a request whole and judging it, before it"
                            " goes upstream; 408 past it (default 30, or longer than"
                            " tokens.timeout_s; 0: none)")
    from ..render.options import DEFAULT_MAX_CONNECTIONS

    envoy.add_argument("--max-connections", type=count, default=DEFAULT_MAX_CONNECTIONS,
                       metavar="N",
                       help="downstream connections Envoy keeps open at most, across its"
                            f" listeners (default {DEFAULT_MAX_CONNECTIONS}; Envoy's overload"
                            " manager)")
    envoy.add_argument("--data-path", choices=("ext_authz", "native"), default="ext_authz",
                       help="ext_authz (default): the sidecar decides every request;"
                            " native: Envoy enforces visibility (RBAC) and injects tokens"
                            " itself, and the sidecar serves it listener, clusters and tokens"
                            " (xDS), deciding only requests it must read (tool rules,"
                            " registry, discovery)")
    envoy.add_argument("--listen-cert", default=None, metavar="FILE",
                       help="the listener's certificate: TLS for callers, who must then"
                            " present certificates (needed by principals in network rules)")
    envoy.add_argument("--listen-key", default=None, metavar="FILE",
                       help="the key of --listen-cert")
    envoy.add_argument("--client-ca", default=None, metavar="FILE",
                       help="the CA that signs callers' certificates (their URI SANs are the"
                            " principals rules name)")
    envoy.add_argument("--sidecar-ca", default=None, metavar="FILE",
                       help="CA that signed the sidecar's certificate (when grpc.tls is set)")
    envoy.add_argument("--sidecar-cert", default=None, metavar="FILE",
                       help="Envoy's client certificate (when grpc.tls.client_ca_file is set)")
    envoy.add_argument("--sidecar-key", default=None, metavar="FILE",
                       help="the key of --sidecar-cert")
    envoy.add_argument("--sidecar-sni", default="", metavar="NAME",
                       help="SNI to send to the sidecar (a name its certificate carries)")
    envoy.add_argument("--node-id", default=None, metavar="ID",
                       help="the Envoy's node id, one per Envoy a sidecar feeds (native data"
                            " path; default: mcp-ext-authz-HOSTNAME-LISTENPORT)")
    envoy.add_argument("--output", default=None, metavar="FILE",
                       help="write to this file (whole, or not at all), not stdout")
    envoy.set_defaults(func=cmd_envoy_config)
