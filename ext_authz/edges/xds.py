"""The native data path's control plane: Envoy's listener, clusters and token secrets (xDS).

State of the world over one stream: the Aggregated Discovery Service, which the generated
native bootstrap asks for its listener (LDS), upstream clusters (CDS) and each server's
token (SDS), and the Secret Discovery Service, for a hand-written Envoy config that takes
only the tokens. Each stream is sent what changed, when it changed: a reload (listener and
clusters rendered again from the new config) or a token replaced or expired (the secret).

A token that expired without a successor is sent as an empty secret, never left in place:
Envoy's credential injector then fails the request (401, answered as our 503). Envoy keeps
the last secret it was sent while no control plane answers (it neither expires resources
by TTL nor drops a removed secret): the watchdog that bounds that is Envoy's health check
of the admin listener's /tokens/NAME (envoy_config), whose address is resolved here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format

from .._proto.envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from .._proto.envoy.service.secret.v3 import sds_pb2
from ..ops.metrics import Metrics
from ..policy.config import Config
from ..tokens import TokenCache

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SDS_SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Loaded for server reflection, which describes the services from these descriptors.
SERVICE_DESCRIPTORS = (ads_pb2.DESCRIPTOR, sds_pb2.DESCRIPTOR)
TYPE_NAMES = {LISTENER_TYPE: "listener", CLUSTER_TYPE: "cluster", SECRET_TYPE: "secret"}

Resources = tuple[tuple[str, bytes], ...]  # (name, serialized message), in a fixed order


class RenderError(Exception):
    """The config cannot be turned into this Envoy's listener and clusters."""


async def _resolve(host: str) -> str:
    """An IP for a host name (an IP stays as it is), IPv4 first as Envoy's sidecar cluster
    prefers: Envoy takes no name in a health check's address."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RenderError(f"cannot resolve {host!r}, where Envoy reaches the sidecar's"
                          f" admin listener for the watchdog ({exc})") from None
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    return str(found[0][4][0])


class ControlPlane:
    """Serves every connected Envoy what the current config and tokens make of it."""

    def __init__(self, config: Callable[[], Config], tokens: TokenCache,
                 metrics: Metrics) -> None:
        self._config = config
        self._tokens = tokens
        self._metrics = metrics
        self._wakes: set[asyncio.Event] = set()
        self._rendered: dict[tuple[int, str], tuple[Config, Resources, Resources]] = {}
        self._nonces = itertools.count(1)

    def changed(self) -> None:
        """The config or a token changed: every stream looks again at what it was sent."""
        for wake in self._wakes:
            wake.set()

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """ADS and SDS, to register on a grpc.aio server: one stream handler serves both."""
        def method() -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
            )
        return (grpc.method_handlers_generic_handler(
                    ADS_SERVICE, {"StreamAggregatedResources": method()}),
                grpc.method_handlers_generic_handler(SDS_SERVICE, {"StreamSecrets": method()}))

    # -- one stream -------------------------------------------------------------------

    async def stream(self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """One Envoy's subscription: answer each request, push each change, until it leaves."""
        wake = asyncio.Event()
        subscribed: dict[str, tuple[str, ...]] = {}
        node: dict[str, Any] = {}
        reader = asyncio.get_running_loop().create_task(
            self._read(context, subscribed, node, wake))
        self._wakes.add(wake)
        self._metrics.xds_streams.inc()
        sent: dict[str, Resources] = {}
        versions = itertools.count(1)
        try:
            while not reader.done():
                waiting = asyncio.get_running_loop().create_task(wake.wait())
                await asyncio.wait((reader, waiting), return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                wake.clear()
                for type_url, names in list(subscribed.items()):
                    resources = await self._resources(type_url, names, node)
                    if resources is None or sent.get(type_url) == resources:
                        continue
                    sent[type_url] = resources
                    await context.write(discovery_pb2.DiscoveryResponse(
                        version_info=str(next(versions)),
                        resources=[any_pb2.Any(type_url=type_url, value=value)
                                   for _, value in resources],
                        type_url=type_url, nonce=str(next(self._nonces))))
                    self._metrics.xds_pushes.labels(TYPE_NAMES.get(type_url, "other")).inc()
            reader.result()  # an error reading ends the stream with it
        finally:
            reader.cancel()
            self._wakes.discard(wake)
            self._metrics.xds_streams.dec()

    async def _read(self, context: grpc.aio.ServicerContext[Any, Any],
                    subscribed: dict[str, tuple[str, ...]], node: dict[str, Any],
                    wake: asyncio.Event) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            if request.HasField("node") and not node:
                node.update(json_format.MessageToDict(request.node.metadata))
                node["_id"] = request.node.id
            if request.HasField("error_detail") and request.error_detail.code:
                # A NACK: Envoy keeps what it had. Sent again only once something changes.
                kind = TYPE_NAMES.get(request.type_url, "other")
                self._metrics.xds_rejections.labels(kind).inc()
                # Envoy quotes what it rejected, which for a secret would be the token.
                said = "" if kind == "secret" else f": {request.error_detail.message[:2000]}"
                log.error("Envoy %r rejected the %ss we sent%s", node.get("_id", ""), kind,
                          said)
            names = tuple(sorted(request.resource_names))
            if subscribed.get(request.type_url) != names:
                subscribed[request.type_url] = names
                wake.set()

    # -- what a stream is sent --------------------------------------------------------

    async def _resources(self, type_url: str, names: tuple[str, ...],
                         node: Mapping[str, Any]) -> Resources | None:
        """What this Envoy is to hold of a type now; None to send nothing (yet)."""
        if type_url == SECRET_TYPE:
            return self._secrets(names)
        if type_url not in (LISTENER_TYPE, CLUSTER_TYPE):
            return ()
        try:
            listener, clusters = await self._render(node)
        except RenderError as exc:
            log.error("cannot serve Envoy %r its %s: %s", node.get("_id", ""),
                      TYPE_NAMES[type_url], exc)
            return None
        return listener if type_url == LISTENER_TYPE else clusters

    async def _render(self, node: Mapping[str, Any]) -> tuple[Resources, Resources]:
        from ..render.bootstrap import (
            NODE_KEY,
            DataPlane,
            HostPort,
            data_plane_resources,
            watchdog_address,
        )

        config = self._config()
        plane_data = node.get(NODE_KEY)
        if not isinstance(plane_data, Mapping):
            raise RenderError(f"its node metadata has no {NODE_KEY!r} (a bootstrap written"
                              " by `envoy-config --data-path native` has)")
        try:
            plane = DataPlane.from_struct(plane_data)
            watchdog = watchdog_address(config, plane)
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        if isinstance(watchdog, HostPort):
            watchdog = HostPort(await _resolve(watchdog.host), watchdog.port)
        key = (id(config), repr((sorted(plane_data.items()), watchdog)))
        cached = self._rendered.get(key)
        if cached is not None and cached[0] is config:
            return cached[1], cached[2]
        try:
            listener, clusters = data_plane_resources(config, plane, watchdog=watchdog)
        except ValueError as exc:
            raise RenderError(str(exc)) from None
        rendered = (((listener.name, bytes(listener)),),
                    tuple((c.name, bytes(c)) for c in clusters))
        self._rendered = {key: (config, *rendered)}  # one config is served at a time
        return rendered

    def _secrets(self, names: tuple[str, ...]) -> Resources:
        from envoy_data_plane.envoy.config.core.v3 import DataSource
        from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
            GenericSecret,
            Secret,
        )

        from ..render.bootstrap import TOKEN_SECRET_PREFIX

        servers = self._config().servers
        secrets = []
        for name in names:
            server = servers.get(name.removeprefix(TOKEN_SECRET_PREFIX))
            token = None
            if name.startswith(TOKEN_SECRET_PREFIX) and server is not None and server.oauth2:
                token = self._tokens.cached(server.oauth2)
            # No token (none yet, or expired without a successor), or a name we do not
            # know: an empty secret, with which Envoy injects nothing and fails the request.
            secret = Secret(name=name, generic_secret=GenericSecret(
                secret=DataSource(inline_string=token or "")))
            secrets.append((name, bytes(secret)))
        return tuple(secrets)
