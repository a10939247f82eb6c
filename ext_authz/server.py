"""The running sidecar: grpc.aio server, health, reflection, admin HTTP, reload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .admin import AdminServer, Readiness
from .config import Config, load_config
from .decision_log import DecisionLog
from .errors import ConfigError
from .metrics import Metrics
from .service import SERVICE_NAME, AuthorizationService, ServiceState
from .tokens import TokenCache, credentials

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl-C: drain and exit 0
    signal.SIGTERM,  # orchestrator stop: drain and exit 0
)
RELOAD_SIGNAL = signal.SIGHUP  # re-read the config file; keep the old one if the new is bad


def _server_credentials(config: Config) -> grpc.ServerCredentials | None:
    tls = config.grpc.tls
    if tls is None:
        return None
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Sidecar:
    """One serving process: built from a config, then start()ed and stop()ped."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        decision_log: DecisionLog | None = None,
        grace_s: float = 5.0,
    ) -> None:
        self.config_path = config_path
        self.grace_s = grace_s
        self.metrics = Metrics()
        self.tokens = TokenCache(config.tokens, on_fetch=self.metrics.count_token_fetch)
        self.metrics.watch_token_ages(self.tokens.ages)
        self.service = AuthorizationService(
            ServiceState.build(config, 1), self.tokens, self.metrics, decision_log
        )
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._ready = False
        self._warmup: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    @property
    def config(self) -> Config:
        return self.service.state.config

    @property
    def admin_port(self) -> int | None:
        return self._admin.port if self._admin is not None else None

    # -- phases -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listeners and begin warming tokens; health turns SERVING once warm."""
        config = self.config
        self.metrics.config_generation.set(1)
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)]
        )
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        credentials_ = _server_credentials(config)
        if credentials_ is None:
            self.grpc_port = server.add_insecure_port(config.grpc.listen)
        else:
            self.grpc_port = server.add_secure_port(config.grpc.listen, credentials_)
        await server.start()
        self._grpc = server
        if config.admin is not None:
            self._admin = AdminServer(config.admin.listen, self.metrics.registry, self.readiness)
            await self._admin.start()
        self.tokens.retain(credentials((n, s.oauth2) for n, s in config.servers.items()))
        self._warmup = asyncio.get_running_loop().create_task(self._serve_when_warm())
        log.info("serving ext_authz on %s (port %d), %d servers",
                 config.grpc.listen, self.grpc_port, len(config.servers))

    async def _serve_when_warm(self) -> None:
        # Envoy's default ext_authz timeout is 200 ms: taking traffic before the tokens are
        # in hand would turn every first request into a cold fetch racing that timeout.
        await self.tokens.wait_ready()
        self._ready = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        log.info("all tokens warm: health SERVING")

    def readiness(self) -> Readiness:
        return Readiness(self._ready, self.tokens.unready())

    async def reload(self) -> bool:
        """Re-read the config file; apply it if valid, else log and keep serving the old one."""
        if self.config_path is None:
            log.warning("reload requested, but serving the built-in config: nothing to re-read")
            return False
        async with self._reload_lock:
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
                self._check_reloadable(config)
            except ConfigError as exc:
                log.error("config reload rejected, still serving generation %d: %s",
                          self.service.state.generation, "; ".join(exc.problems))
                self.metrics.config_reloads.labels("rejected").inc()
                self.metrics.config_last_reload_ok.set(0)
                return False
            generation = self.service.state.generation + 1
            self.service.state = ServiceState.build(config, generation)
            self.tokens.settings = config.tokens
            self.tokens.retain(credentials((n, s.oauth2) for n, s in config.servers.items()))
            self.metrics.config_generation.set(generation)
            self.metrics.config_reloads.labels("ok").inc()
            self.metrics.config_last_reload_ok.set(1)
            log.info("config generation %d applied: %d servers", generation, len(config.servers))
            return True

    def _check_reloadable(self, config: Config) -> None:
        old = self.config
        problems = [
            f"{key}: changing it needs a restart"
            for key, a, b in (
                ("grpc.listen", old.grpc.listen, config.grpc.listen),
                ("admin.listen", old.admin and old.admin.listen,
                 config.admin and config.admin.listen),
            )
            if a != b
        ]
        if problems:
            raise ConfigError(problems, str(self.config_path))

    async def stop(self) -> None:
        """Turn health NOT_SERVING, drain in-flight checks for the grace period, close."""
        await self.health.enter_graceful_shutdown()
        if self._warmup is not None:
            self._warmup.cancel()
        if self._grpc is not None:
            await self._grpc.stop(self.grace_s)
        if self._admin is not None:
            await self._admin.close()
        await self.tokens.aclose()
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
        finally:
            for sig in (*HANDLED_SIGNALS, RELOAD_SIGNAL):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()
