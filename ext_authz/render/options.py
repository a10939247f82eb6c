"""What shapes a rendering besides the sidecar's config: envoy-config's flags, as values.

No Envoy types here: the CLI builds these, and the native data path reads them back from
Envoy's node metadata (DataPlane)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..contract import NODE_KEY
from ..policy.config import Config, UpstreamAddress

# Envoy's edge guidance: a limit on open downstream connections (without one, Envoy warns at
# start, and a flood of idle connections takes all the memory there is).
DEFAULT_MAX_CONNECTIONS = 50_000

DataPath = Literal["ext_authz", "native"]
DATA_PATHS: tuple[DataPath, ...] = ("ext_authz", "native")

# Envoy must wait longer than one whole cold token fetch, or its generic 403 wins the race
# against the sidecar's own 503.
AUTHZ_TIMEOUT_MARGIN_S = 0.5
DEFAULT_RECEIVE_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 86400 * 365


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(host.strip("[]"), int(port))


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """A sidecar listening on `unix:PATH` (`grpc.listen`), worker i on PATH.i."""

    path: str

SidecarAddress = HostPort | UnixSocket


def parse_sidecar(text: str) -> SidecarAddress:
    """`host:port` or `unix:/path`, as `grpc.listen` spells it."""
    if text.startswith("unix:"):
        if len(text) <= len("unix:"):
            raise ValueError(f"{text!r}: unix: needs a path")
        return UnixSocket(text[len("unix:"):])
    return HostPort.parse(text)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long Envoy lets an MCP request run, and sit silent (0: no limit).

    MCP needs both unlimited by default: a tool call may run for minutes before it answers,
    and a server-to-client GET stream may carry nothing for hours. Envoy's own defaults
    (a 15 s route timeout, a 300 s stream idle timeout) cut both.

    The request itself, though, must arrive in `receive_s` (408 past it, HCM
    request_timeout), and be judged in as long again (500, the bodies cluster's
    max_stream_duration): ext_proc reads the body in FULL_DUPLEX_STREAMED mode, to which
    Envoy 1.40 applies no message_timeout, so a sidecar that took the stream and never
    answered would hold the request for ever (never forwarding it). The sidecar ends each
    such stream as soon as it has judged the request.
    """

    request_s: float = 0  # the whole request and its answer (RouteAction.timeout)
    idle_s: float = 0  # no bytes either way (RouteAction.idle_timeout)
    # Until the request is sent upstream whole (HCM request_timeout). None: 30 s, or longer
    # when a cold token fetch may take longer (its 503 must beat Envoy's 408).
    receive_s: float | None = None

    def receive(self, config: Config) -> float:
        """The receive limit for this config; a ValueError if it would cut a token fetch."""
        fetch = config.tokens.timeout_s + AUTHZ_TIMEOUT_MARGIN_S
        if self.receive_s is None:
            return max(DEFAULT_RECEIVE_TIMEOUT_S, fetch + AUTHZ_TIMEOUT_MARGIN_S)
        if 0 < self.receive_s <= fetch:
            raise ValueError(f"--receive-timeout {self.receive_s:g} must be longer than"
                             f" tokens.timeout_s + {AUTHZ_TIMEOUT_MARGIN_S:g} ({fetch:g}), or"
                             " a slow token fetch ends in Envoy's 408 rather than the"
                             " sidecar's 503")
        return self.receive_s

    def __post_init__(self) -> None:
        for name, value in (("request", self.request_s), ("idle", self.idle_s),
                            ("receive", self.receive_s or 0)):
            if not 0 <= value <= MAX_TIMEOUT_S:
                raise ValueError(f"--{name}-timeout {value:g}: give 0 (no limit) or up to"
                                 f" {MAX_TIMEOUT_S} seconds")


NO_TIMEOUTS = Timeouts()  # MCP's defaults: no request or idle limit


@dataclass(frozen=True, slots=True)
class SidecarTLS:
    """How Envoy reaches a sidecar that serves TLS (`grpc.tls`): CA, and a client cert for mTLS."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    sni: str = ""


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """The listener's TLS, for callers who present certificates (principals in rules)."""

    cert_file: str
    key_file: str
    client_ca_file: str  # the CA whose certificates name callers (their URI SANs)


def check_tls(config: Config, tls: SidecarTLS | None) -> None:
    served = config.grpc.tls
    if served is None:
        if tls is not None:
            raise ValueError("--sidecar-ca given, but the sidecar serves plaintext (no grpc.tls)")
        return
    if tls is None:
        raise ValueError("grpc.tls is set, so Envoy must speak TLS to the sidecar:"
                         " give --sidecar-ca (and --sidecar-cert/--sidecar-key for mTLS)")
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("give both --sidecar-cert and --sidecar-key, or neither")
    if served.client_ca_file is not None and tls.cert_file is None:
        raise ValueError("grpc.tls.client_ca_file requires a client certificate:"
                         " give --sidecar-cert and --sidecar-key")


def sidecar_endpoints(address: SidecarAddress, workers: int) -> list[SidecarAddress]:
    """One endpoint per worker process (see `serve --workers`): consecutive ports, or the
    socket path with `.i` appended for worker i > 0."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: the sidecar runs at least one worker")
    if isinstance(address, UnixSocket):
        return [UnixSocket(address.path if i == 0 else f"{address.path}.{i}")
                for i in range(workers)]
    if address.port + workers - 1 > 65535:
        raise ValueError(f"--workers {workers} from port {address.port} runs past port 65535")
    return [HostPort(address.host, address.port + i) for i in range(workers)]


def resolve_upstreams(config: Config, given: Mapping[str, UpstreamAddress]
                      ) -> dict[str, UpstreamAddress]:
    """Each server's upstream: `--upstream NAME=...` if given, else `servers.NAME.upstream`."""
    unknown = sorted(set(given) - set(config.servers))
    if unknown:
        raise ValueError("--upstream names unconfigured server(s): " + ", ".join(unknown))
    resolved = {}
    for name, server in config.servers.items():
        if name in given:
            resolved[name] = given[name]
        elif server.upstream is not None:
            resolved[name] = UpstreamAddress.parse(server.upstream)
    missing = sorted(set(config.servers) - set(resolved))
    if missing:
        raise ValueError("no upstream for server(s): " + ", ".join(missing)
                         + " (give --upstream NAME=URL, or servers.NAME.upstream)")
    return resolved


def _upstream_text(upstream: UpstreamAddress) -> str:
    address = str(HostPort(upstream.host, upstream.port))
    return address if upstream.scheme is None else (
        f"{upstream.scheme}://{address}{upstream.path or ''}")


@dataclass(frozen=True, slots=True)
class DataPlane:
    """What shapes the listener and the upstream clusters besides the sidecar's config:
    envoy-config's flags.

    In the native data path the listener and clusters come from the sidecar (LDS and CDS
    over one ADS stream), so that a config reload reaches Envoy without a restart. Envoy
    tells the sidecar these flags in its node metadata, set in the bootstrap.
    """

    listen: HostPort
    upstreams: Mapping[str, UpstreamAddress]  # --upstream: over servers.NAME.upstream
    upstream_ca: str | None = None
    timeouts: Timeouts = Timeouts()
    sidecar_host: str = "127.0.0.1"  # where Envoy reaches the sidecar (--sidecar's host)
    listener_tls: ListenerTLS | None = None

    def to_struct(self) -> dict[str, Any]:
        tls = self.listener_tls
        return {
            "listener_tls": None if tls is None else {
                "cert_file": tls.cert_file, "key_file": tls.key_file,
                "client_ca_file": tls.client_ca_file},
            "sidecar_host": self.sidecar_host,
            "listen": str(self.listen),
            "upstreams": {name: _upstream_text(u) for name, u in sorted(self.upstreams.items())},
            "upstream_ca": self.upstream_ca,
            "request_timeout_s": self.timeouts.request_s,
            "idle_timeout_s": self.timeouts.idle_s,
            "receive_timeout_s": self.timeouts.receive_s,
        }

    @classmethod
    def from_struct(cls, data: Mapping[str, Any]) -> DataPlane:
        """Read node metadata back; ValueError naming what is wrong."""
        try:
            upstreams = data.get("upstreams") or {}
            ca = data.get("upstream_ca")
            receive = data.get("receive_timeout_s")
            if not isinstance(upstreams, Mapping) or not (ca is None or isinstance(ca, str)):
                raise TypeError("upstreams or upstream_ca")
            tls = data.get("listener_tls")
            if not (tls is None or isinstance(tls, Mapping)):
                raise TypeError("listener_tls")
            return cls(
                listen=HostPort.parse(str(data["listen"])),
                upstreams={str(name): UpstreamAddress.parse(str(text))
                           for name, text in upstreams.items()},
                upstream_ca=ca,
                timeouts=Timeouts(float(data.get("request_timeout_s") or 0),
                                  float(data.get("idle_timeout_s") or 0),
                                  None if receive is None else float(receive)),
                sidecar_host=str(data.get("sidecar_host") or "127.0.0.1"),
                listener_tls=None if tls is None else ListenerTLS(
                    str(tls["cert_file"]), str(tls["key_file"]), str(tls["client_ca_file"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"node metadata {NODE_KEY!r} is not what envoy-config writes"
                             f" ({type(exc).__name__}: {exc})") from None


def watchdog_address(config: Config, plane: DataPlane) -> SidecarAddress:
    """The sidecar's admin listener, as Envoy reaches it: what the watchdog checks (its host
    may be a name, which Envoy cannot take there: the control plane resolves it)."""
    if config.admin is None:
        raise ValueError("the native data path needs admin.listen: Envoy checks there that"
                         " the sidecar still holds each server's token (the watchdog)")
    listen = config.admin.listen
    if listen.startswith("unix:"):
        return UnixSocket(listen[len("unix:"):])
    address = HostPort.parse(listen)
    if address.host in ("0.0.0.0", "::", ""):  # every address: the one Envoy dials
        return HostPort(plane.sidecar_host, address.port)
    return address
