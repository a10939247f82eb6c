"""The running sidecar: grpc.aio server, health, reflection, admin HTTP, reload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .contract import (
    ADS_SERVICE,
    AUTHZ_SERVICE,
    EXT_PROC_SERVICE,
    SDS_SERVICE,
    token_secret_name,
)
from .edges.authz import AuthorizationService
from .edges.ext_proc import ExternalProcessingService
from .edges.generation import Generation, Serving
from .edges.operator import OperatorView, ReloadRecord
from .edges.xds import ControlPlane, Snapshots
from .errors import ConfigError, ExtAuthzError
from .exchange import ExchangeCache
from .ops.admin import AdminServer, Readiness
from .ops.decision_log import FLUSH_INTERVAL_S, DecisionLog
from .ops.metrics import Metrics
from .policy.config import (
    Config,
    TLSSettings,
    config_warnings,
    load_config,
    with_port_offset,
)
from .tokens import TokenCache

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl-C: drain and exit 0
    signal.SIGTERM,  # orchestrator stop: drain and exit 0
)
RELOAD_SIGNAL = signal.SIGHUP  # re-read the config file; keep the old one if the new is bad

GRPC_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a second process on our port is a mistake, not a balancer
    ("grpc.max_concurrent_streams", 1000),
)
# Envoy sends request bodies of up to mcp.max_body_bytes (and did not bound HTTP/2 bodies by
# its own buffer limits), and answers of up to mcp.max_answer_bytes to be rewritten: room
# for either, its headers and metadata, and no more.
MESSAGE_HEADROOM = 1024 * 1024
MIN_RECEIVE_LIMIT = 4 * 1024 * 1024  # grpc's default


def receive_limit(config: Config) -> int:
    """The largest gRPC message the sidecar takes (set at start; raising it needs a restart)."""
    return max(MIN_RECEIVE_LIMIT, config.mcp.max_body_bytes + MESSAGE_HEADROOM,
               config.mcp.max_answer_bytes + MESSAGE_HEADROOM)

FileStamp = tuple[int, int, int] | None


def _stamp(path: Path) -> FileStamp:
    try:
        # stat follows symlinks, so a Kubernetes ConfigMap/Secret swap shows as a change.
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _certificate_configuration(tls: TLSSettings) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
    )


class _ReloadableCertificates:
    """Server certificates that a reload can replace for new connections (grpc core asks)."""

    def __init__(self, tls: TLSSettings) -> None:
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(tls),
            self._fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"
            require_client_authentication=tls.client_ca_file is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc core before each handshake; None means "keep what you have".
        pending, self._pending = self._pending, None
        return pending

    def replace(self, tls: TLSSettings) -> None:
        self._pending = _certificate_configuration(tls)


def _open_decision_log(config: Config) -> DecisionLog | None:
    try:
        return DecisionLog.from_settings(config.decision_log)
    except OSError as exc:
        raise ExtAuthzError(f"decision_log.path: cannot open {config.decision_log.path} for"
                            f" appending ({exc.strerror})") from None


def _snapshots() -> Snapshots:
    from .render.native import Snapshots as NativeSnapshots

    return NativeSnapshots()


class Sidecar:
    """One serving process: built from a config, then start()ed and stop()ped."""

    def __init__(self, config: Config, config_path: Path | None = None, *,
                 grace_s: float = 5.0, worker: int = 0) -> None:
        self.config_path = config_path
        self.grace_s = grace_s
        self.worker = worker
        config = with_port_offset(config, worker)
        self.metrics = Metrics()
        self.tokens = TokenCache(config.tokens, on_fetch=self.metrics.count_token_fetch)
        self.metrics.watch_token_ages(self.tokens.ages)
        self.serving = Serving(Generation.build(config, 1), self.metrics,
                               _open_decision_log(config))
        self.exchanges = ExchangeCache(config.tokens,
                                       on_outcome=self.metrics.count_token_exchange)
        self.service = AuthorizationService(self.serving, self.tokens, self.exchanges)
        self.ext_proc = ExternalProcessingService(self.serving, refused=self.exchanges.evict_key)
        # The native data path's control plane: told of every reload and token change.
        self.control_plane = ControlPlane(lambda: self.config, self.tokens, self.metrics,
                                          _snapshots)
        self.tokens.on_change = self.control_plane.tokens_changed
        self.operator = OperatorView(self.serving, self.tokens,
                                     None if config_path is None else str(config_path),
                                     self.exchanges)
        self.health = health.aio.HealthServicer()
        self._receive_limit = receive_limit(config)
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._certificates: _ReloadableCertificates | None = None
        self._ready = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._stamps: dict[Path, FileStamp] = {}

    @property
    def config(self) -> Config:
        return self.serving.state.config

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin is not None else None

    # -- phases -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and begin warming tokens; health turns SERVING once warm."""
        config = self.config
        self.metrics.config_generation.set(1)
        self.metrics.config_last_reload_ok.set(1)  # the config served is one that loaded
        for warning in config_warnings(config):
            log.warning("config: %s", warning)
        self._receive_limit = receive_limit(config)
        server = grpc.aio.server(options=(
            *GRPC_OPTIONS, ("grpc.max_receive_message_length", self._receive_limit)))
        server.add_generic_rpc_handlers((self.service.handler(), self.ext_proc.handler(),
                                         *self.control_plane.handlers()))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (AUTHZ_SERVICE, EXT_PROC_SERVICE, ADS_SERVICE, SDS_SERVICE, health.SERVICE_NAME,
             reflection.SERVICE_NAME),
            server,
        )
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, NOT_SERVING)
        try:
            if config.grpc.tls is None:
                self.grpc_port = server.add_insecure_port(config.grpc.listen)
            else:
                self._certificates = _ReloadableCertificates(config.grpc.tls)
                self.grpc_port = server.add_secure_port(
                    config.grpc.listen, self._certificates.credentials
                )
        except RuntimeError as exc:  # grpc says only "Failed to bind"
            raise ExtAuthzError(
                f"grpc.listen: cannot listen on {config.grpc.listen} (in use or unavailable)"
            ) from exc
        await server.start()
        self._grpc = server
        if config.admin is not None:
            self._admin = AdminServer(config.admin.listen, self.metrics.registry, self.readiness,
                                      self.token_usable,
                                      self.operator if config.admin.page else None,
                                      self.page_token)
            try:
                await self._admin.start()
            except OSError as exc:
                await server.stop(0)
                raise ExtAuthzError(
                    f"admin.listen: cannot listen on {config.admin.listen} ({exc.strerror})"
                ) from exc
        self.tokens.retain(config.credentials())
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._serve_when_warm()))
        self._tasks.append(loop.create_task(self._flush_decision_log()))
        if self.config_path is not None and config.reload.watch:
            self._stamps = self._current_stamps()
            self._tasks.append(loop.create_task(self._watch_files()))
        log.info("serving ext_authz on %s (port %d), %d servers",
                 config.grpc.listen, self.grpc_port, len(config.servers))

    async def _serve_when_warm(self) -> None:
        # Envoy's default ext_authz timeout is 200 ms: taking traffic before the tokens are
        # in hand would turn every first request into a cold fetch racing that timeout.
        await self.tokens.wait_ready()
        self._ready = True
        for name in ("", AUTHZ_SERVICE):
            await self.health.set(name, SERVING)
        log.info("all tokens warm: health SERVING")

    async def _flush_decision_log(self) -> None:
        # Lines are buffered on the hot path; this bounds how stale the file can get.
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self.serving.decision_log is not None:
                self.serving.decision_log.flush()

    def token_usable(self, server: str, node: str | None = None) -> bool:
        """Whether this sidecar holds a usable token for the server (the native watchdog);
        with a node id, whether that Envoy holds it too: its stream open, the current token
        ACKed. An Envoy that has not reconnected since a restart is told no, and sends
        nothing rather than the token it kept from before."""
        settings = self.config.credentials().get(server)
        if settings is None or self.tokens.cached(settings) is None:
            return False
        return node is None or self.control_plane.serves(node, token_secret_name(server))

    def page_token(self) -> str | None:
        """The status page's token, as the config being served read it (None: no auth)."""
        auth = self.config.admin.auth if self.config.admin is not None else None
        if auth is None:
            return None
        if auth.token is None:  # a config loaded without its files: the page takes no one
            return "\x00unread"  # no header carries a NUL: nothing matches
        return auth.token.get_secret_value()

    def readiness(self) -> Readiness:
        return Readiness(self._ready, self.tokens.unready())

    # -- reload -------------------------------------------------------------------------

    def _current_stamps(self) -> dict[Path, FileStamp]:
        assert self.config_path is not None
        paths = (self.config_path, *self.config.watched_files())
        return {path: _stamp(path) for path in paths}

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload.poll_interval_s)
            stamps = self._current_stamps()
            if stamps != self._stamps:
                self._stamps = stamps
                log.info("config or a file it names changed: reloading")
                await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else log and keep serving the old one.

        The new config is built off the hot path and swapped in with one assignment;
        checks already running finish on the generation they started with.
        """
        if self.config_path is None:
            log.warning("reload requested, but serving the built-in config: nothing to re-read")
            return False
        async with self._reload_lock:
            # What is being read now is what the file watch has seen: a SIGHUP and the next
            # poll do not reload (nor count a rejection) twice for one edit.
            self._stamps = self._current_stamps()
            try:
                loaded = await asyncio.to_thread(load_config, self.config_path)
                config = with_port_offset(loaded, self.worker)
                self._check_reloadable(config)
                decision_log = self.serving.decision_log
                if config.decision_log != self.config.decision_log:
                    decision_log = _open_decision_log(config)
                if config.grpc.tls is not None and self._certificates is not None:
                    self._certificates.replace(config.grpc.tls)
            except (ConfigError, ExtAuthzError, OSError) as exc:
                problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
                self.operator.last_reload = ReloadRecord(ok=False, problems=problems)
                log.error("config reload rejected, still serving generation %d: %s",
                          self.serving.state.generation, "; ".join(problems))
                self.metrics.config_reloads.labels("rejected").inc()
                self.metrics.config_last_reload_ok.set(0)
                return False
            generation = self.serving.state.generation + 1
            if decision_log is not self.serving.decision_log and self.serving.decision_log:
                self.serving.decision_log.close()
            self.serving.decision_log = decision_log
            exchanges_changed = config.exchanges() != self.config.exchanges()
            self.serving.state = Generation.build(config, generation)
            self.operator.last_reload = ReloadRecord()
            self.tokens.settings = config.tokens
            self.tokens.retain(config.credentials())
            self.exchanges.settings = config.tokens
            if exchanges_changed:
                self.exchanges.clear()  # a server's exchange changed or went: its users' too
            self.control_plane.changed()
            self._stamps = self._current_stamps()
            self.metrics.config_generation.set(generation)
            self.metrics.config_reloads.labels("ok").inc()
            self.metrics.config_last_reload_ok.set(1)
            log.info("config generation %d applied: %d servers", generation, len(config.servers))
            for warning in config_warnings(config):
                log.warning("config: %s", warning)
            return True

    def _check_reloadable(self, config: Config) -> None:
        old = self.config
        changed = [
            key
            for key, a, b in (
                ("grpc.listen", old.grpc.listen, config.grpc.listen),
                ("grpc.tls", old.grpc.tls is None, config.grpc.tls is None),
                ("grpc.tls.client_ca_file", old.grpc.tls and old.grpc.tls.client_ca_file is None,
                 config.grpc.tls and config.grpc.tls.client_ca_file is None),
                ("admin.listen", old.admin and old.admin.listen,
                 config.admin and config.admin.listen),
            )
            if a != b
        ]
        problems = [f"{key}: changing it needs a restart" for key in changed]
        if receive_limit(config) > self._receive_limit:
            key = ("max_answer_bytes" if config.mcp.max_answer_bytes > config.mcp.max_body_bytes
                   else "max_body_bytes")
            problems.append(f"mcp.{key}: raising it past what the gRPC listener was"
                            " started with needs a restart")
        if problems:
            raise ConfigError(problems, str(self.config_path))

    # -- shutdown -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Turn health NOT_SERVING, drain in-flight checks for the grace period, close."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        if self._grpc is not None:
            await self._grpc.stop(self.grace_s)
        if self._admin is not None:
            await self._admin.close()
        await self.tokens.aclose()
        await self.exchanges.aclose()
        if self.serving.decision_log is not None:
            self.serving.decision_log.close()
        log.info("stopped")

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM (reloading on SIGHUP), then stop."""
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(RELOAD_SIGNAL, lambda: loop.create_task(self.reload()))
        await self.start()
        try:
            await self._stopping.wait()
            log.info("signal received: draining for up to %.1fs", self.grace_s)
        finally:
            for sig in (*HANDLED_SIGNALS, RELOAD_SIGNAL):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()
