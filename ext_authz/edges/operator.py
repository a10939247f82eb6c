"""What the status page shows, as JSON: the running config and its state, who sees what,
recent decisions, a caller tried, a change previewed. Read-only: nothing here changes the
config, the tokens or the policy; a preview builds a Policy of its own and drops it.

Every answer is computed by what serves requests (the compiled Policy, the pipeline that
`check` runs, the decision log's fields, `diff`), never a second reading of the config.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import ConfigError
from ..exchange import ExchangeCache
from ..mcp.jsonrpc import body_headers, request_body
from ..ops.decision_log import stamp
from ..policy.compile import Policy, ServerPolicy
from ..policy.config import Config, config_warnings, parse_yaml
from ..policy.decision import RequestFacts, client_placement
from ..policy.diff import callers, cell, diff, items, placement
from ..policy.explain import check_report
from ..policy.network import NO_IDENTITY, claims_payload, identity_from_claims
from ..tokens import TokenCache
from .generation import Serving
from .pipeline import judge

MAX_TRY_BODY = 64 * 1024  # a tried request's body, as the page sends it


@dataclass
class ReloadRecord:
    """The last reload: when, whether it took, and if not why (its key paths)."""

    at: float = field(default_factory=time.time)
    ok: bool = True
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"at": stamp(self.at), "ok": self.ok, "problems": self.problems}


class OperatorView:
    """The status page's data, from the sidecar's own state."""

    def __init__(self, serving: Serving, tokens: TokenCache, config_file: str | None,
                 exchanges: ExchangeCache | None = None) -> None:
        self.serving = serving
        self.tokens = tokens
        self.exchanges = exchanges
        self.config_file = config_file
        self.last_reload: ReloadRecord | None = None  # None: no reload since start
        self.started = time.time()

    # -- the running state --------------------------------------------------------------

    def status(self, peer: str, x_forwarded_for: str | None) -> dict[str, Any]:
        state = self.serving.state
        config, policy = state.config, state.policy
        return {
            "generation": state.generation,
            "config_file": self.config_file,
            "started": stamp(self.started),
            "last_reload": None if self.last_reload is None else self.last_reload.to_json(),
            "warnings": config_warnings(config),
            "servers": self._servers(config, policy),
            "networks": _networks(config),
            "you": _caller(policy, peer, x_forwarded_for),
            "matrix": matrix(policy),
        }

    def _servers(self, config: Config, policy: Policy) -> list[dict[str, Any]]:
        tokens = self.tokens.states()
        held = self.exchanges.held() if self.exchanges is not None else {}
        found = []
        for name, server in policy.servers.items():
            settings = config.servers[name]
            visibility = server.visibility
            if visibility.public:
                badge = "Public"
            elif visibility.audience:
                badge = "visible to: " + ", ".join(visibility.audience)
            else:
                badge = "Internal"
            address = server.address
            found.append({
                "name": name,
                "title": settings.title or "",
                "badge": badge,
                "public": visibility.public,
                "visible_to": list(visibility.audience),
                "upstream": settings.upstream,
                "route": None if address is None else address.path or address.host,
                "rules": {"tools": len(settings.tools), "prompts": len(settings.prompts),
                          "resources": len(settings.resources)},
                "token": self._token(name, server, tokens, held),
            })
        return found

    @staticmethod
    def _token(name: str, server: ServerPolicy, tokens: dict[str, dict[str, Any]],
               held: dict[str, int]) -> dict[str, Any]:
        """A server's token state: its own token's, or for a token exchange how many users'
        are held (and its actor token's state): never a token, never a user."""
        if server.exchange is not None:
            state: dict[str, Any] = {"state": "per_user", "users": held.get(name, 0)}
            if server.exchange.actor_token:
                state["actor"] = tokens.get(name, {"state": "fetching"})
            return state
        if server.oauth2 is not None:
            return tokens.get(name, {"state": "fetching"})
        return {"state": "none"}

    def decisions(self, **wanted: str) -> dict[str, Any]:
        return {"decisions": self.serving.recent.records(**wanted)}

    # -- what a caller would get --------------------------------------------------------

    async def try_caller(self, asked: dict[str, Any]) -> dict[str, Any]:
        """`check` for a caller described by the page's form: address, X-Forwarded-For,
        principal, JWT claims (as Envoy would have verified them), path, optional body.
        No token is fetched."""
        policy = self.serving.state.policy
        claims = asked.get("claims") or None
        try:
            if isinstance(claims, str):  # as the page's form sends it
                claims = claims_payload(claims) if claims.strip() else None
            elif claims is not None and not isinstance(claims, dict):
                raise ValueError("give a JSON object, the JWT's payload")
        except ValueError as exc:
            raise ValueError(f"claims: {exc}") from None
        data = str(asked.get("body") or "").encode()
        if len(data) > MAX_TRY_BODY:
            raise ValueError(f"body: over {MAX_TRY_BODY} bytes")
        method = "POST" if data else "GET"
        headers = [("content-type", "application/json")] if data else []
        body = request_body(data, method, body_headers(headers))
        facts = RequestFacts(
            peer=_text(asked, "peer") or "127.0.0.1",
            x_forwarded_for=_text(asked, "x_forwarded_for") or None,
            path=_text(asked, "path") or "/",
            authority=_text(asked, "host") or "gateway",
            method=method,
            identity=identity_from_claims(_text(asked, "principal"), claims,
                                          policy.networks.claim_names),
            scheme="http",
        )
        judged = await judge(facts, policy, body=lambda: body, can_rename=True, fetch=None)
        return check_report(judged.decision, body)

    def preview(self, asked: dict[str, Any]) -> dict[str, Any]:
        """`diff` of the running config against a proposed one: pasted YAML, or the running
        config with one server's public flag turned. The YAML comes back to be committed;
        nothing is written or applied."""
        running = self.serving.state
        toggle = _text(asked, "toggle_public")
        if toggle:
            if toggle not in running.config.servers:
                raise ValueError(f"toggle_public: no server {toggle!r}")
            text = self._toggled(toggle)
        else:
            text = _text(asked, "config")
            if not text.strip():
                raise ValueError("config: paste a config, or name a server to toggle")
        try:
            proposed = parse_yaml(text, source="the proposed config", secrets=False)
        except ConfigError as exc:
            return {"valid": False, "problems": exc.problems}
        found: dict[str, Any] = {"valid": True, "diff": diff(
            running.policy, Policy.from_config(proposed)).to_json()}
        if toggle:  # the YAML to commit (a pasted one is the operator's own already)
            found["yaml"] = text
        return found

    def _toggled(self, server: str) -> str:
        """The running config file with one server's `available_on_public_internet` turned
        (re-written from its parsed YAML: its comments do not survive)."""
        if self.config_file is None:
            raise ValueError("toggle_public: the sidecar serves the built-in config, which"
                             " has no file to change")
        with open(self.config_file, encoding="utf-8") as file:
            data = yaml.safe_load(file)
        if not isinstance(data, dict) or server not in (data.get("servers") or {}):
            raise ValueError(f"toggle_public: {self.config_file} no longer names server"
                             f" {server!r} (edited since it was loaded?)")
        settings = data["servers"][server] or {}
        public = self.serving.state.config.servers[server].available_on_public_internet
        settings["available_on_public_internet"] = not public
        if public is False:
            settings.pop("visible_to", None)  # a public server takes no visible_to
        data["servers"][server] = settings
        return str(yaml.safe_dump(_without_secrets(data), sort_keys=False))


REDACTED = "${REDACTED}"  # an inline secret of the file: put yours back before committing


def _without_secrets(value: Any, key: str = "") -> Any:
    """The config's data with every secret written inline replaced (a ${VAR} stays: it is a
    name, not a secret). The page never shows a secret, even the file's own."""
    if isinstance(value, dict):
        return {k: _without_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    if "secret" in key and isinstance(value, str) and not re.fullmatch(
            r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}", value):
        return REDACTED
    return value


def matrix(policy: Policy) -> dict[str, Any]:
    """Who sees what: each caller class against each server and item rule."""
    classes = callers(policy)
    rows = []
    for item in items(policy):
        rows.append({"item": item.label, "server": item.server, "kind": item.kind,
                     "key": item.key,
                     "cells": {caller: cell(policy, item, placement(policy, caller)).seen
                               for caller in classes}})
    return {"callers": classes, "rows": rows}


def _networks(config: Config) -> dict[str, Any]:
    network = config.network
    return {
        "internal_ranges": [str(n) for n in network.internal_ranges],
        "networks": {name: {"cidrs": [str(c) for c in definition.cidrs],
                            "principals": list(definition.principals),
                            "jwt_claims": {k: list(v) for k, v in definition.jwt_claims.items()}}
                     for name, definition in network.networks.items()},
        "trusted_proxies": [str(n) for n in network.trusted_proxies],
        "max_xff_entries": network.max_xff_entries,
        "max_xff_bytes": network.max_xff_bytes,
    }


def _caller(policy: Policy, peer: str, x_forwarded_for: str | None) -> dict[str, Any]:
    """The page's own request, read as a request to the gateway is: its address (through
    trusted proxies) and the networks that holds. From the sidecar, never a third party."""
    client, where = client_placement(peer, x_forwarded_for, NO_IDENTITY, policy)
    return {"peer": peer, "x_forwarded_for": x_forwarded_for,
            "client_ip": None if client.address is None else str(client.address),
            "source": client.source, "network": where.name, "networks": sorted(where.members)}


def _text(asked: dict[str, Any], key: str) -> str:
    value = asked.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key}: give a string")
    return value
