"""A decision in words: the steps `check` prints, and its JSON report."""

from __future__ import annotations

import json
from typing import Any

from ..contract import NO_SERVER
from ..mcp.jsonrpc import NO_BODY, Body, read_item_uses
from .decision import Decision
from .network import Placement
from .visibility import Visibility, named_item


def _placement(placement: Placement) -> str:
    who = f"; identity: {', '.join(placement.matched)}" if placement.matched else ""
    if not placement.members:
        return "network: external (in no configured network)"
    if len(placement.members) == 1:
        return f"network: {placement.name}{who}"
    others = ", ".join(sorted(placement.members - {placement.name}))
    return f"network: {placement.name} (the most specific; also in {others}){who}"


def _visibility(decision: Decision, visibility: Visibility, what: str) -> str:
    if visibility.public:
        return f"{what} is available on the public internet"
    audience = ", ".join(sorted(visibility.visible_to))
    limited = f"{what} is internal-only" + (f" (also visible to {audience})" if audience else "")
    if decision.placement.internal:
        return f"{limited}; the caller is internal"
    seen_by = sorted(visibility.visible_to & decision.placement.members)
    if seen_by:
        return f"{limited}; the caller is in {', '.join(seen_by)}"
    return f"{limited}; the caller is {decision.network}"


def explain(decision: Decision) -> list[str]:
    """Describe each step of a decision in words, for `check` and for debugging."""
    if decision.reason == "bad_request":
        return [decision.detail]
    steps = [decision.client.explain(), _placement(decision.placement)]
    target = decision.route
    if target.kind == "registry":
        steps.append("the registry (routing.registry_path): it lists the servers this caller"
                     " may see")
    elif target.name is None:
        steps.append("no server named by context extension, path or host")
    elif target.name == NO_SERVER:
        steps.append("the route names no server (Envoy's catch-all route)")
    else:
        steps.append(f"server {target.name!r} named by {target.source.replace('_', ' ')}")
    if target.kind == "discovery" and decision.reason == "resource_metadata":
        steps.append("OAuth protected-resource metadata (RFC 9728) of that server, answered"
                     " by the gateway: callers' tokens are the `jwt` issuer's, and exchanged")
    elif target.kind == "discovery":
        steps.append("OAuth protected-resource metadata (RFC 9728) of that server: its"
                     " `resource` is rewritten to the gateway's URL")
    server = decision.server
    if server is None:
        if target.name:
            steps.append(f"server {target.name!r} is not configured")
    else:
        steps.append(_visibility(decision, server.visibility, f"server {server.name!r}"))
        if decision.tool or decision.item:
            kind, key = named_item(decision.item) if decision.item else ("tool", decision.tool)
            steps.append(_visibility(decision, server.rules(kind)[key], f"{kind} {key!r}"))
    if decision.reason == "registry":
        listed = json.loads(decision.reply)["servers"]
        steps.append("lists: " + (", ".join(s["name"] for s in listed) or "no server"))
    elif decision.oauth2 is not None:
        steps.append(f"token for client_id {decision.oauth2.client_id!r} would be injected")
    elif decision.token_exchange is not None:
        exchange = decision.token_exchange
        steps.append(f"the caller's token, as Envoy verified it, would be exchanged (RFC 8693,"
                     f" client_id {exchange.client_id!r}) and the exchanged one injected in"
                     " its place" + (", with the gateway's own as the actor"
                                     if exchange.actor_token else ""))
    elif decision.goes_upstream:
        steps.append("server has no oauth2 nor token_exchange settings: the caller's own"
                     " token goes on")
    if decision.detail:
        steps.append(decision.detail)
    if decision.reason in ("tool_hidden", "item_hidden"):
        what = named_item(decision.item)[0] if decision.item else "tool"
        steps.append(f"the request goes on under a fresh name, for the server to answer as"
                     f" the unknown {what} it then is (unknown_tool_reply: server)")
    if decision.rule:
        steps.append(f"decided by {decision.rule}")
    steps.append(f"decision: {decision.reason} (HTTP {decision.http_status})")
    return steps


def check_report(decision: Decision, body: Body = NO_BODY) -> dict[str, Any]:
    """The JSON object `check` prints for a decision."""
    client = decision.client.address
    used = read_item_uses(body, len(body.data) + 1, 1_000_000).uses if body.data else ()
    return {
        "client_ip": str(client) if client is not None else None,
        "network": decision.network,
        "networks": sorted(decision.placement.members),
        "identity": list(decision.placement.matched),  # which principal or claim matched
        "server": decision.server_name,
        "route": decision.route.kind,  # mcp, registry or discovery
        "tools_called": [use.name for use in used if use.kind == "tool"],
        # Every tool, prompt and resource the body uses, by kind.
        "items_used": [{"kind": use.kind, "name": use.name} for use in used],
        "tool": decision.tool or None,  # the configured tool whose rule applied
        "item": decision.item or None,  # the configured prompt or resource whose rule applied
        "rule": decision.rule or None,  # the config key that decided visibility
        "allowed": decision.allowed,  # a hidden tool's call is not, though it goes on:
        "renamed": decision.renamed,  # under a fresh name, for the server to answer
        "http_status": decision.http_status,
        "reason": decision.reason,
        "inject_token": decision.oauth2 is not None or decision.token_exchange is not None,
        "reply": decision.reply.decode() if decision.reply else None,
        "steps": explain(decision),
    }
