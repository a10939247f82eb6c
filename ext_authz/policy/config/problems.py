"""What is wrong with a config, in words that name the key: validation errors, cross-key
problems, unreadable files, and warnings for what is valid but almost certainly a mistake."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from ...client_assertion import KeyProblem, signing_key
from ..network import INTERNAL
from .base import split_listen
from .models import Config, TLSSettings


def key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part.startswith(("function-", "tagged-union")) or part in {"list[...]"}:
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts) or "(top level)"

# pydantic's messages for the common mistakes, in our words.
_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a setting here (misspelt, or in the wrong section?)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "finite_number": "must be a finite number",
}

# Where a setting's value may be shown back (never a secret's).
_SHOWN_TYPES = frozenset(("bool_type", "bool_parsing", "int_type", "int_parsing",
                          "int_from_float", "float_type", "float_parsing", "literal_error",
                          "greater_than", "greater_than_equal", "less_than",
                          "less_than_equal"))


def describe_error(error: Any) -> str:
    """One pydantic error as `key.path: what is wrong`, in our words."""
    path = key_path(error["loc"])
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "value_error":
        message = str(context.get("error", error["msg"]))
    elif kind == "literal_error":
        message = f"must be one of {context.get('expected')}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter(context.values()), "")
        words = {"greater_than": "more than", "greater_than_equal": "at least",
                 "less_than": "less than", "less_than_equal": "at most"}[kind]
        message = f"must be {words} {bound}"
    else:
        message = _MESSAGES.get(kind, error["msg"])
    if kind in _SHOWN_TYPES and "secret" not in path and not isinstance(
            error.get("input"), dict | list):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def exchange_problems(config: Config) -> list[str]:
    """A token exchange needs the caller's token verified by Envoy, from Authorization."""
    problems = []
    for name in config.exchanges():
        key = f"servers.{name}.token_exchange"
        if config.jwt is None:
            problems.append(f"{key}: needs `jwt`, the provider whose tokens Envoy verifies:"
                            " only a caller's token Envoy verified is exchanged")
        elif config.jwt.header != "authorization":
            problems.append(f"{key}.subject_token: the caller's token is exchanged from its"
                            f" Authorization header, but jwt.header is {config.jwt.header!r}")
    return problems


def visibility_problems(config: Config) -> list[str]:
    """Check every visible_to against the named networks, and that tools, prompts and
    resources only narrow their server."""
    known = [name for name, _ in config.network.named()]
    problems = []

    def unknown(key: str, names: tuple[str, ...]) -> None:
        for index, name in enumerate(names):
            if name not in known:
                problems.append(f"{key}[{index}]: unknown network {name!r}"
                                f" (known: {', '.join(known)})")

    for server_name, server in config.servers.items():
        key = f"servers.{server_name}"
        if server.visible_to and server.available_on_public_internet:
            problems.append(f"{key}.visible_to: only a server with"
                            " available_on_public_internet: false takes visible_to"
                            " (a public server is visible to every network)")
        unknown(f"{key}.visible_to", server.visible_to)
        for kind, items in server.item_rules():
            for item_name, item in items.items():
                item_key = f"{key}.{kind}s.{item_name}"
                if item.available_on_public_internet and not server.available_on_public_internet:
                    problems.append(f"{item_key}.available_on_public_internet: a {kind} of an"
                                    f" internal-only server cannot be public (a {kind} only"
                                    " narrows what its server allows)")
                if item.visible_to and item.available_on_public_internet:
                    problems.append(f"{item_key}.visible_to: only a {kind} with"
                                    " available_on_public_internet: false takes visible_to")
                unknown(f"{item_key}.visible_to", item.visible_to)
                if not server.available_on_public_internet:
                    for index, name in enumerate(item.visible_to):
                        if name in known and name not in (INTERNAL, *server.visible_to):
                            problems.append(
                                f"{item_key}.visible_to[{index}]: network {name!r} cannot see"
                                f" server {server_name!r} (add it to {key}.visible_to first:"
                                f" a {kind} only narrows what its server allows)")
    return problems


def read_files(config: Config) -> tuple[Config, list[str]]:
    """Read every `client_secret_file` into `client_secret` and `private_key_file` into
    `private_key` (a key that cannot sign is said so now); check the TLS files load."""
    problems: list[str] = []
    servers = dict(config.servers)
    for name, server in config.servers.items():
        update = {}
        for section, settings in server.token_settings:
            path = settings.credential_file
            if path is None:
                continue
            field = ("private_key" if settings.auth_method == "private_key_jwt"
                     else "client_secret")
            key = f"servers.{name}.{section}.{field}_file"
            text = _read(key, path, problems)
            if text is None:
                continue
            secret = text.rstrip("\r\n")
            if not secret:
                problems.append(f"{key}: {str(path)!r} is empty")
                continue
            if field == "private_key":
                try:
                    signing_key(secret)
                except KeyProblem as exc:
                    problems.append(f"{key}: {str(path)!r}: {exc}")
                    continue
            update[section] = settings.model_copy(update={field: SecretStr(secret)})
        if update:
            servers[name] = server.model_copy(update=update)
    if config.grpc.tls is not None:
        problems += _tls_problems(config.grpc.tls)
    admin = config.admin
    if admin is not None and admin.auth is not None:
        token = _admin_token(admin.auth.token_file, problems)
        admin = admin.model_copy(update={"auth": admin.auth.model_copy(
            update={"token": SecretStr(token) if token else None})})
    return config.model_copy(update={"servers": servers, "admin": admin}), problems


def _read(key: str, path: Path, problems: list[str]) -> str | None:
    """A secret file's text, or None with the problem said under `key`."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{key}: cannot read {str(path)!r} ({exc})")
        return None


def _admin_token(path: Path, problems: list[str]) -> str | None:
    """The status page's token from its file, or None with the problem said."""
    key = "admin.auth.token_file"
    text = _read(key, path, problems)
    if text is None:
        return None
    token = text.strip()
    if len(token) < 16:
        problems.append(f"{key}: {str(path)!r} holds {len(token)} characters; give at least"
                        " 16 (e.g. `openssl rand -hex 32 > FILE`)")
        return None
    return token


def _tls_problems(tls: TLSSettings) -> list[str]:
    # Load them as the gRPC listener will, so that a key that does not match its certificate
    # is said so here, not as "cannot listen" at start nor as a successful reload.
    missing = [f"grpc.tls.{key}: {str(path)!r} is not a readable file"
               for key in ("cert_file", "key_file", "client_ca_file")
               if (path := getattr(tls, key)) is not None and not Path(path).is_file()]
    if missing:
        return missing
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as exc:
        reason = "does not match grpc.tls.cert_file" if "KEY_VALUES_MISMATCH" in str(
            exc) else f"cannot be loaded with grpc.tls.cert_file ({exc.reason or exc})"
        return [f"grpc.tls.key_file: {str(tls.key_file)!r} {reason}"]
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(tls.client_ca_file)
        except ssl.SSLError as exc:
            return [f"grpc.tls.client_ca_file: {str(tls.client_ca_file)!r} holds no usable"
                    f" CA certificate ({exc.reason or exc})"]
    return []


def config_warnings(config: Config) -> list[str]:
    """What is valid but almost certainly a mistake: said on stderr and in the service log."""
    warnings = []
    if not config.servers:
        warnings.append("servers: none configured: every request is answered 404")
    for key, networks in (("network.trusted_proxies", config.network.trusted_proxies),
                          ("network.internal_ranges", config.network.internal_ranges),
                          *((f"network.networks.{name}", network.cidrs)
                            for name, network in config.network.networks.items())):
        for index, network in enumerate(networks):
            if network.prefixlen == 0:
                meaning = ("every address may then forge X-Forwarded-For"
                           if key == "network.trusted_proxies" else
                           "every caller, the whole internet, is then in it")
                warnings.append(f"{key}[{index}]: {network} holds every address: {meaning}")
    if config.exchanges() and config.jwt is not None and not config.jwt.audiences:
        warnings.append("jwt.audiences: empty, and a server exchanges its callers' tokens: a"
                        " token the issuer minted for any other service would be exchanged"
                        " too; name the gateway's audience")
    return warnings


def listener_problems(config: Config) -> list[str]:
    """The gRPC and admin listeners on one address: one of them could not start."""
    if config.admin is None:
        return []
    grpc, admin = config.grpc.listen, config.admin.listen
    if grpc.startswith("unix:") or admin.startswith("unix:"):
        clash = grpc == admin
    else:
        (grpc_host, grpc_port), (admin_host, admin_port) = map(split_listen, (grpc, admin))
        anywhere = ("0.0.0.0", "[::]", "::")
        clash = grpc_port == admin_port != 0 and (
            grpc_host == admin_host or grpc_host in anywhere or admin_host in anywhere)
    if not clash:
        return []
    return [f"admin.listen: {admin} is where grpc.listen ({grpc}) listens too: give each its"
            " own port"]


def beyond_this_host(listen: str) -> bool:
    """Whether a listen address can be reached from other hosts (not loopback, no socket)."""
    if listen.startswith("unix:"):
        return False
    host = split_listen(listen)[0].strip("[]")
    try:
        return not (host == "localhost" or ipaddress.ip_address(host).is_loopback)
    except ValueError:
        return True  # a name: whatever it resolves to, not only this host


def exposure_problems(config: Config) -> list[str]:
    """A gRPC listener that hands tokens to whoever reaches it, beyond this host; a status
    page that shows the config to whoever reaches it."""
    problems = []
    grpc, admin = config.grpc, config.admin
    if (beyond_this_host(grpc.listen) and not grpc.allow_unauthenticated
            and (grpc.tls is None or grpc.tls.client_ca_file is None)):
        problems.append(
            f"grpc.listen: {grpc.listen} is reachable beyond this host, and whoever can open"
            " a stream there reads every server's token (Check answers, SDS): give grpc.tls"
            " a client_ca_file (mTLS: only Envoy's certificate gets in), or say"
            " grpc.allow_unauthenticated: true")
    if admin is not None and admin.page and admin.auth is None and beyond_this_host(
            admin.listen):
        problems.append(
            f"admin.listen: {admin.listen} is reachable beyond this host, and its status page"
            " shows the config and recent callers: give admin.auth.token_file, or say"
            " admin.page: false (/metrics, /healthz, /readyz and /tokens stay open either"
            " way)")
    return problems
