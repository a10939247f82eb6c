"""Linux network namespaces for the topology tests: hosts, bridges, veth links, /etc/hosts.

Everything a Lab makes lives inside namespaces it created: the bridges sit in a namespace of
their own (playing the Docker host), each service gets one, and veth pairs are created
directly inside the namespaces they join. Nothing is added to the machine's own network
namespace, so no test traffic can leave the lab. `Lab.close()` removes it all, and a new Lab
first removes what a killed earlier run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ext_authz.policy.network import IPAddress

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

PREFIX = "mcpx"  # every namespace a Lab makes is named "mcpx<pid>-<name>"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def ip(*args: str) -> None:
    """Run one `ip` command; raise with its stderr if it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"`ip netns add` fails: {exc}"
    try:
        ip("-n", probe, "link", "add", "b0", "type", "bridge")
    except RuntimeError as exc:
        return f"bridges cannot be made in a namespace: {exc}"
    finally:
        ip("netns", "del", probe)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete the namespaces (and /etc/netns entries) of Labs whose process has died."""
    removed = []
    names = [p.name for p in NETNS_DIR.iterdir()] if NETNS_DIR.is_dir() else []
    names += [p.name for p in ETC_NETNS.iterdir()] if ETC_NETNS.is_dir() else []
    for name in sorted(set(names)):
        owner = name[len(PREFIX):].partition("-")[0]
        if not name.startswith(PREFIX) or not owner.isdigit() or _alive(int(owner)):
            continue
        _delete_namespace(name)
        removed.append(name)
    return removed


def _kill_pids(namespace: str) -> None:
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                            text=True, timeout=30, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def _delete_namespace(namespace: str) -> None:
    if (NETNS_DIR / namespace).exists():
        _kill_pids(namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30,
                       check=False)
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


class Lab:
    """The namespaces, bridges and links of one test run; `close()` removes them all."""

    def __init__(self) -> None:
        remove_stale()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.namespaces: list[str] = []
        self.hub = self.namespace("hub")  # holds the bridges, like a Docker host
        self._links = 0
        self._bridges = 0

    def namespace(self, name: str) -> str:
        """Create namespace `<tag>-<name>` with loopback up; return its full name."""
        full = f"{self.tag}-{name}"
        ip("netns", "add", full)
        self.namespaces.append(full)
        ip("-n", full, "link", "set", "lo", "up")
        (ETC_NETNS / full).mkdir(parents=True, exist_ok=True)
        # DNS queries for names not in the namespace's hosts file stay inside it.
        (ETC_NETNS / full / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.write_hosts(full, {})
        return full

    def bridge(self, name: str, gateways: Iterable[IPInterface]) -> str:
        """A bridge in the hub namespace, holding the network's gateway addresses."""
        self._bridges += 1
        bridge = f"br{self._bridges}-{name}"[:15]
        ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
        ip("-n", self.hub, "link", "set", bridge, "up")
        for gateway in gateways:
            _add_address(self.hub, bridge, gateway)
        return bridge

    def link(self, namespace: str, ifname: str, bridge: str,
             addresses: Iterable[IPInterface]) -> None:
        """Plug `namespace` into `bridge` through a veth pair named `ifname` on its side."""
        self._links += 1
        port = f"p{self._links}"
        ip("link", "add", "name", ifname, "netns", namespace, "type", "veth",
           "peer", "name", port, "netns", self.hub)
        ip("-n", self.hub, "link", "set", port, "master", bridge)
        ip("-n", self.hub, "link", "set", port, "up")
        for address in addresses:
            _add_address(namespace, ifname, address)
        ip("-n", namespace, "link", "set", ifname, "up")

    def write_hosts(self, namespace: str, names: dict[str, list[IPAddress]]) -> None:
        """The /etc/hosts that processes started with `ip netns exec` see."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{address} {name}" for name, addresses in names.items()
                  for address in addresses]
        (ETC_NETNS / namespace / "hosts").write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        for namespace in reversed(self.namespaces):
            _delete_namespace(namespace)
        self.namespaces.clear()


def _add_address(namespace: str, ifname: str,
                 address: IPInterface) -> None:
    extra = ["nodad"] if address.version == 6 else []  # usable at once, no DAD wait
    ip("-n", namespace, "addr", "add", str(address), "dev", ifname, *extra)


_libc = ctypes.CDLL(None, use_errno=True)


def run_in(namespace: str, function: Callable[[], T], timeout: float = 60) -> T:
    """Call `function` on a new thread that has joined `namespace`; return what it returns.

    A network namespace is per thread: sockets the function opens (an asyncio loop it runs
    included) belong to the namespace, while the rest of the test process stays where it is.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(function())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{function!r} in {namespace} did not finish in {timeout} s")
    if error:
        raise error[0]
    return result[0]


def netns_exec(namespace: str, argv: list[str]) -> list[str]:
    """The argv that runs `argv` inside `namespace`, with its /etc/hosts."""
    return ["ip", "netns", "exec", namespace, *argv]
