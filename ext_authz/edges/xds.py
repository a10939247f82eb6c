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
of the admin listener's /tokens/NAME?node=ID (render/native.py), which `serves` answers for
that Envoy: its stream open, a token from this process ACKed.

Many Envoys may share one sidecar: a token change looks at secrets only, and what a reload
renders is built once per shape of Envoy (render.native.Snapshots).

What each stream is sent is built by render.native.Snapshots (go-control-plane's snapshot);
this module keeps the streams' bookkeeping only (versions, nonces, ACKs and NACKs).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2, json_format

from .._proto.envoy.service.discovery.v3 import ads_pb2, discovery_pb2
from .._proto.envoy.service.secret.v3 import sds_pb2
from ..contract import ADS_SERVICE, SDS_SERVICE, TOKEN_SECRET_PREFIX
from ..ops.metrics import Metrics
from ..policy.config import Config
from ..tokens import TokenCache

log = logging.getLogger(__name__)

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# Loaded for server reflection, which describes the services from these descriptors.
SERVICE_DESCRIPTORS = (ads_pb2.DESCRIPTOR, sds_pb2.DESCRIPTOR)
TYPE_NAMES = {LISTENER_TYPE: "listener", CLUSTER_TYPE: "cluster", SECRET_TYPE: "secret"}

Resources = tuple[tuple[str, bytes], ...]  # (name, serialized message), in a fixed order


class Snapshots(Protocol):
    """What the control plane serves, built elsewhere (render.native.Snapshots): this module
    keeps the streams' bookkeeping only."""

    async def resources(self, config: Config, node: Mapping[str, Any]
                        ) -> tuple[Resources, Resources]:
        """The listener and the clusters for an Envoy; a ValueError saying why not."""

    def secret(self, name: str, token: str) -> bytes:
        """A token as a serialized SDS secret ("" : none)."""


@dataclass(eq=False)
class _Stream:
    """One Envoy's stream: what it asked for, what it was sent, what it took."""

    node: dict[str, Any] = field(default_factory=dict)
    subscribed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The types to look at again: a subscription, a reload (all), a token (secrets only).
    dirty: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, Resources] = field(default_factory=dict)
    # The secrets of each response not yet ACKed (by nonce), and the last ACKed.
    pending_secrets: dict[str, Resources] = field(default_factory=dict)
    acked_secrets: Resources = ()

    @property
    def node_id(self) -> str:
        return str(self.node.get("_id", ""))

    def touch(self, types: frozenset[str] | tuple[str, ...]) -> None:
        self.dirty.update(types)
        self.wake.set()


class ControlPlane:
    """Serves every connected Envoy what the current config and tokens make of it."""

    def __init__(self, config: Callable[[], Config], tokens: TokenCache,
                 metrics: Metrics, snapshots: Callable[[], Snapshots]) -> None:
        self._config = config
        # Made when an Envoy first asks: the renderer is loaded only where one does.
        self._make_snapshots = snapshots
        self._built: Snapshots | None = None
        self._tokens = tokens
        self._metrics = metrics
        self._streams: set[_Stream] = set()
        self._nonces = itertools.count(1)

    def changed(self) -> None:
        """The config changed: every stream looks again at all it was sent."""
        for stream in self._streams:
            stream.touch(tuple(stream.subscribed))

    def tokens_changed(self) -> None:
        """A token changed: every stream looks again at its secrets, and only at them (the
        listener and clusters do not hold tokens). Several at once are one look."""
        for stream in self._streams:
            stream.touch((SECRET_TYPE,))

    def serves(self, node_id: str, secret_name: str) -> bool:
        """Whether the Envoy of this node id holds a token under that secret name from this
        process: its stream is open and it ACKed a response holding the secret, not empty.
        (A token this process pushed is good until the empty secret that follows it: the
        cache empties a token before it expires, by `expiry_buffer_s`.) What the watchdog
        answers for that Envoy: after a restart, no until it is back."""
        empty = self._snapshots().secret(secret_name, "")
        for stream in self._streams:
            if stream.node_id == node_id:
                held = dict(stream.acked_secrets).get(secret_name)
                if held is not None and held != empty:
                    return True
        return False

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
        stream = _Stream()
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(context, stream))
        self._streams.add(stream)
        self._metrics.xds_streams.inc()
        versions = itertools.count(1)
        waiting: asyncio.Task[bool] | None = None
        try:
            while not reader.done():
                waiting = loop.create_task(stream.wake.wait())
                await asyncio.wait((reader, waiting), return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                stream.wake.clear()
                dirty, stream.dirty = stream.dirty, set()
                for type_url, names in list(stream.subscribed.items()):
                    if type_url not in dirty:
                        continue
                    resources = await self._resources(type_url, names, stream.node)
                    if resources is None or stream.sent.get(type_url) == resources:
                        continue
                    stream.sent[type_url] = resources
                    nonce = str(next(self._nonces))
                    if type_url == SECRET_TYPE:
                        stream.pending_secrets[nonce] = resources
                    await context.write(discovery_pb2.DiscoveryResponse(
                        version_info=str(next(versions)),
                        resources=[any_pb2.Any(type_url=type_url, value=value)
                                   for _, value in resources],
                        type_url=type_url, nonce=nonce))
                    self._metrics.xds_pushes.labels(TYPE_NAMES.get(type_url, "other")).inc()
            reader.result()  # an error reading ends the stream with it
        finally:
            # Cancelled mid-wait (the Envoy left): no waiter is left pending.
            if waiting is not None:
                waiting.cancel()
            reader.cancel()
            self._streams.discard(stream)
            self._metrics.xds_streams.dec()
            if stream.node_id:
                log.info("Envoy %r disconnected", stream.node_id)

    async def _read(self, context: grpc.aio.ServicerContext[Any, Any], stream: _Stream) -> None:
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            if request.HasField("node") and not stream.node:
                stream.node.update(json_format.MessageToDict(request.node.metadata))
                stream.node["_id"] = request.node.id
                log.info("Envoy %r connected", request.node.id)
            kind = TYPE_NAMES.get(request.type_url, "other")
            if request.HasField("error_detail") and request.error_detail.code:
                # A NACK: Envoy keeps what it had. Sent again only once something changes.
                self._metrics.xds_rejections.labels(kind).inc()
                # Envoy quotes what it rejected, which for a secret would be the token.
                said = "" if kind == "secret" else f": {request.error_detail.message[:2000]}"
                log.error("Envoy %r rejected the %ss we sent%s", stream.node_id, kind, said)
                stream.pending_secrets.pop(request.response_nonce, None)
            elif request.type_url == SECRET_TYPE and request.response_nonce:
                acked = stream.pending_secrets.pop(request.response_nonce, None)
                if acked is not None:
                    stream.acked_secrets = acked
                    # Older responses can no longer be ACKed.
                    stream.pending_secrets.clear()
            names = tuple(sorted(request.resource_names))
            if stream.subscribed.get(request.type_url) != names:
                stream.subscribed[request.type_url] = names
                stream.touch((request.type_url,))

    # -- what a stream is sent --------------------------------------------------------

    async def _resources(self, type_url: str, names: tuple[str, ...],
                         node: Mapping[str, Any]) -> Resources | None:
        """What this Envoy is to hold of a type now; None to send nothing (yet)."""
        if type_url == SECRET_TYPE:
            return self._secrets(names)
        if type_url not in (LISTENER_TYPE, CLUSTER_TYPE):
            return ()
        try:
            listener, clusters = await self._snapshots().resources(self._config(), node)
        except ValueError as exc:
            log.error("cannot serve Envoy %r its %s: %s", node.get("_id", ""),
                      TYPE_NAMES[type_url], exc)
            return None
        return listener if type_url == LISTENER_TYPE else clusters

    def _snapshots(self) -> Snapshots:
        if self._built is None:
            self._built = self._make_snapshots()
        return self._built

    def _secrets(self, names: tuple[str, ...]) -> Resources:
        servers = self._config().servers
        secrets = []
        for name in names:
            server = servers.get(name.removeprefix(TOKEN_SECRET_PREFIX))
            token = None
            if name.startswith(TOKEN_SECRET_PREFIX) and server is not None and server.oauth2:
                token = self._tokens.cached(server.oauth2)
            # No token (none yet, or expired without a successor), or a name we do not
            # know: an empty secret, with which Envoy injects nothing and fails the request.
            secrets.append((name, self._snapshots().secret(name, token or "")))
        return tuple(secrets)
