"""Client-IP resolution and classification: the trust boundary of the sidecar."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext_authz.policy.config import DEFAULT_INTERNAL_RANGES
from ext_authz.policy.network import (
    IPAddress,
    NetworkMap,
    NetworkSet,
    Placement,
    parse_address,
    resolve_client_ip,
)


def nets(*cidrs: str) -> NetworkSet:
    return NetworkSet(ipaddress.ip_network(c) for c in cidrs)


INTERNAL_MAP = NetworkMap([("internal", [ipaddress.ip_network(c)
                                         for c in DEFAULT_INTERNAL_RANGES])])


def classify(address: IPAddress | None) -> str:
    return INTERNAL_MAP.place(address).name

PROXIES = nets("10.0.0.0/24", "2001:db8:1::/64")
NONE_TRUSTED = nets()


class TestParseAddress:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("1.2.3.4", "1.2.3.4"),
            (" 1.2.3.4 ", "1.2.3.4"),
            ("1.2.3.4:8080", "1.2.3.4"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("[::ffff:192.168.0.1]:80", "192.168.0.1"),
            ("2001:DB8::A", "2001:db8::a"),
        ],
    )
    def test_valid(self, text: str, expected: str) -> None:
        """Ports and brackets are parsed off; IPv4-mapped IPv6 is unmapped."""
        assert parse_address(text) == ipaddress.ip_address(expected)

    @pytest.mark.parametrize(
        "text",
        [
            "", " ", "unknown", "_hidden", "example.com", "1.2.3", "1.2.3.4.5", "256.1.1.1",
            "1.2.3.4:", "1.2.3.4:http", "[::1", "[::1]x", "[::1]:", "[::1]:8a", "::1]",
            "fe80::1%eth0", "[fe80::1%25eth0]:80", "1.2.3.4 5.6.7.8", '"1.2.3.4"',
            "1.2.3.4/32", "0x7f.0.0.1", "1" * 100, "[1.2.3.4]",
        ],
    )
    def test_invalid(self, text: str) -> None:
        """Anything that is not plainly an IP address (with optional port) is rejected."""
        assert parse_address(text) is None


class TestResolveClientIP:
    @pytest.mark.parametrize(
        ("peer", "xff", "client", "source"),
        [
            # An untrusted peer is the client, whatever XFF it forged.
            ("203.0.113.9", "10.0.0.7", "203.0.113.9", "peer"),
            ("203.0.113.9", "127.0.0.1, 10.1.1.1", "203.0.113.9", "peer"),
            ("192.168.1.5", None, "192.168.1.5", "peer"),
            # A trusted proxy: rightmost untrusted entry wins; a forged leftmost is ignored.
            ("10.0.0.1", "203.0.113.9", "203.0.113.9", "xff"),
            ("10.0.0.1", "10.9.9.9, 203.0.113.9", "203.0.113.9", "xff"),
            ("10.0.0.1", "127.0.0.1, 203.0.113.9, 10.0.0.2", "203.0.113.9", "xff"),
            ("10.0.0.1", "203.0.113.9,10.0.0.2,10.0.0.3", "203.0.113.9", "xff"),
            # Every hop trusted: the leftmost is the client.
            ("10.0.0.1", "10.0.0.5, 10.0.0.2", "10.0.0.5", "xff_leftmost"),
            ("10.0.0.1", None, "10.0.0.1", "xff_leftmost"),
            ("10.0.0.1", "  ", "10.0.0.1", "xff_leftmost"),
            # Ports, brackets, IPv4-mapped IPv6 in the chain and the peer.
            ("10.0.0.1", "[2001:db8::7]:5555", "2001:db8::7", "xff"),
            ("10.0.0.1", "198.51.100.2:1234", "198.51.100.2", "xff"),
            ("::ffff:10.0.0.1", "198.51.100.2", "198.51.100.2", "xff"),
            ("[2001:db8:1::1]:99", "198.51.100.2", "198.51.100.2", "xff"),
            ("10.0.0.1", "::ffff:198.51.100.2", "198.51.100.2", "xff"),
            # Garbage anywhere in the part of the chain that is read stops the walk.
            ("10.0.0.1", "unknown", None, "bad_xff"),
            ("10.0.0.1", "203.0.113.9, garbage", None, "bad_xff"),
            ("10.0.0.1", "203.0.113.9,,10.0.0.2", None, "bad_xff"),
            ("10.0.0.1", "10.0.0.2, ", None, "bad_xff"),
            # ...but garbage left of the first untrusted hop is never read.
            ("10.0.0.1", "garbage, 203.0.113.9", "203.0.113.9", "xff"),
            # No usable peer.
            ("", "10.0.0.5", None, "no_peer"),
            ("not-an-ip", None, None, "bad_peer"),
            ("10.0.0.1%eth0", None, None, "bad_peer"),
        ],
    )
    def test_table(self, peer: str, xff: str | None, client: str | None, source: str) -> None:
        """The rightmost-untrusted walk, hop by hop through trusted proxies only."""
        result = resolve_client_ip(peer, xff, PROXIES)
        assert result.source == source
        assert result.address == (ipaddress.ip_address(client) if client else None)

    def test_untrusted_peer_never_reads_xff(self) -> None:
        """With no trusted proxies configured, XFF is ignored entirely."""
        result = resolve_client_ip("203.0.113.9", "127.0.0.1", NONE_TRUSTED)
        assert classify(result.address) == "external"

    def test_too_many_trusted_hops_fails_closed(self) -> None:
        """Beyond max_entries trusted hops the chain is not believed."""
        xff = ", ".join(["10.0.0.9"] * 40)
        result = resolve_client_ip("10.0.0.1", xff, PROXIES, max_entries=32, max_bytes=10_000)
        assert result.address is None
        assert result.source == "xff_too_long"

    @pytest.mark.parametrize("max_entries", [1, 2, 32])
    def test_exactly_max_entries_are_read(self, max_entries: int) -> None:
        """A chain of exactly max_entries entries is read whole (its leftmost, untrusted,
        is the client); one entry more and it is not believed."""
        chain = ["198.51.100.7", *["10.0.0.9"] * (max_entries - 1)]
        result = resolve_client_ip("10.0.0.1", ", ".join(chain), PROXIES,
                                   max_entries=max_entries)
        assert (result.address, result.source) == (ipaddress.ip_address("198.51.100.7"), "xff")
        assert result.hops_read == max_entries
        beyond = ["198.51.100.7", *["10.0.0.9"] * max_entries]  # the client one entry further
        longer = resolve_client_ip("10.0.0.1", ", ".join(beyond), PROXIES,
                                   max_entries=max_entries)
        assert (longer.address, longer.source) == (None, "xff_too_long")
        trusted = resolve_client_ip("10.0.0.1", ", ".join(["10.0.0.8"] * max_entries),
                                    PROXIES, max_entries=max_entries)
        assert (trusted.address, trusted.source) == (ipaddress.ip_address("10.0.0.8"),
                                                     "xff_leftmost")

    def test_untrusted_hop_within_limit_is_found_in_long_chain(self) -> None:
        """A long chain is fine when the first untrusted hop is within the limit."""
        xff = ", ".join(["127.0.0.1"] * 500 + ["198.51.100.7", "10.0.0.2"])
        result = resolve_client_ip("10.0.0.1", xff, PROXIES, max_entries=32, max_bytes=100_000)
        assert result.address == ipaddress.ip_address("198.51.100.7")

    def test_oversized_header_fails_closed(self) -> None:
        """An XFF over max_bytes is not read at all."""
        xff = "203.0.113.9" + " " * 9000
        result = resolve_client_ip("10.0.0.1", xff, PROXIES, max_bytes=8192)
        assert (result.address, result.source) == (None, "xff_too_long")

    @pytest.mark.parametrize("max_bytes", [8192, 1_048_576])
    def test_20000_entry_header_is_bounded(self, max_bytes: int) -> None:
        """A 20,000-entry header costs bounded work and cannot make the caller internal."""
        xff = ", ".join(["10.0.0.3"] * 20_000)
        started = time.perf_counter()
        for _ in range(10):
            result = resolve_client_ip("10.0.0.1", xff, PROXIES, max_bytes=max_bytes)
        assert result.address is None
        assert result.source == "xff_too_long"
        # Not a timing threshold on the unit: a guard against quadratic work (seconds).
        assert time.perf_counter() - started < 5


class TestClassify:
    @pytest.mark.parametrize(
        ("address", "network"),
        [
            ("10.1.2.3", "internal"), ("172.31.255.255", "internal"), ("172.32.0.1", "external"),
            ("192.168.0.1", "internal"), ("127.0.0.1", "internal"), ("169.254.1.1", "internal"),
            ("8.8.8.8", "external"), ("::1", "internal"), ("fd00::1", "internal"),
            ("fe80::1", "internal"), ("2001:db8::1", "external"), ("::", "external"),
            ("0.0.0.0", "external"),
        ],
    )
    def test_default_ranges(self, address: str, network: str) -> None:
        """The default internal ranges cover RFC 1918, loopback, link-local and ULA."""
        assert classify(ipaddress.ip_address(address)) == network

    def test_no_address_is_external(self) -> None:
        """When no client address could be trusted, the caller is external."""
        assert classify(None) == "external"


def named(*networks: tuple[str, list[str]]) -> NetworkMap:
    return NetworkMap([(name, [ipaddress.ip_network(c) for c in cidrs])
                       for name, cidrs in networks])


class TestNetworkMap:
    MAP = named(("internal", ["10.0.0.0/8", "fd00::/8"]), ("partners", ["10.1.0.0/16"]),
                ("lab", ["10.1.2.0/24"]), ("dmz", ["10.1.2.0/24", "203.0.113.0/24"]))

    @pytest.mark.parametrize(
        ("address", "name", "members"),
        [
            ("10.9.9.9", "internal", {"internal"}),
            ("10.1.9.9", "partners", {"internal", "partners"}),
            # lab and dmz are equally specific: the one listed first names the address.
            ("10.1.2.3", "lab", {"internal", "partners", "lab", "dmz"}),
            ("203.0.113.5", "dmz", {"dmz"}),
            ("fd00::1", "internal", {"internal"}),
            ("8.8.8.8", "external", set()),
            ("::ffff:0a01:0203", "external", set()),  # unmapping is parse_address's job
        ],
    )
    def test_most_specific_names_the_address(self, address: str, name: str,
                                             members: set[str]) -> None:
        """Members are every holding network; the longest prefix names it, ties by order."""
        placement = self.MAP.place(ipaddress.ip_address(address))
        assert placement == Placement(name, frozenset(members))
        assert placement.internal == ("internal" in members)

    def test_no_address_is_external(self) -> None:
        """No address at all is in no network."""
        assert self.MAP.place(None) == Placement("external", frozenset())

    @given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                              st.ip_addresses(v=4).map(
                                  lambda a: ipaddress.ip_network(f"{a}/{int(a) % 33}",
                                                                 strict=False))),
                    max_size=8),
           st.ip_addresses(v=4))
    def test_matches_naive_placement(self, entries: list, address: object) -> None:
        """Placement agrees with a scan: membership, longest prefix, first listed."""
        order = list(dict.fromkeys(name for name, _ in entries))
        grouped = [(name, [n for m, n in entries if m == name]) for name in order]
        placement = NetworkMap(grouped).place(address)  # type: ignore[arg-type]
        holding = [(n.prefixlen, -order.index(name), name)
                   for name, n in entries if address in n]
        assert placement.members == {name for _, _, name in holding}
        assert placement.name == (max(holding)[2] if holding else "external")


class TestNetworkSet:
    @given(
        st.lists(st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network(f"{a}/{int(a) % 33}",
                                                                          strict=False)),
                 max_size=8),
        st.lists(st.ip_addresses(v=6).map(lambda a: ipaddress.ip_network(f"{a}/{int(a) % 129}",
                                                                          strict=False)),
                 max_size=8),
        st.ip_addresses(),
    )
    def test_matches_naive_membership(self, v4: list, v6: list, address: object) -> None:
        """Merged, bisected ranges answer exactly as `any(ip in net)` would."""
        networks = [*v4, *v6]
        expected = any(address in n for n in networks)  # type: ignore[operator]
        assert (address in NetworkSet(networks)) == expected


addresses = st.ip_addresses().map(str)
entries = st.one_of(
    addresses,
    addresses.map(lambda a: f"[{a}]:80" if ":" in a else f"{a}:80"),
    st.text(max_size=60),
    st.sampled_from(["unknown", "", " ", "10.0.0.2", "127.0.0.1", "[::1]", "::ffff:10.0.0.1"]),
)


class TestProperties:
    @settings(max_examples=400)
    @given(peer=st.one_of(addresses, st.text(max_size=60)),
           xff=st.one_of(st.none(), st.lists(entries, max_size=40).map(", ".join),
                         st.text(max_size=300)))
    def test_never_raises(self, peer: str, xff: str | None) -> None:
        """Any peer and any header value give an answer, never an exception."""
        result = resolve_client_ip(peer, xff, PROXIES)
        assert (result.address is None) == (
            result.source in {"no_peer", "bad_peer", "bad_xff", "xff_too_long"}
        )
        assert classify(result.address) in {"internal", "external"}

    @settings(max_examples=400)
    @given(peer=addresses, xff=st.one_of(st.none(), st.lists(entries, max_size=40).map(", ".join)))
    def test_untrusted_client_cannot_claim_internal(self, peer: str, xff: str | None) -> None:
        """A peer that is not a trusted proxy is internal only if its own address is."""
        address = ipaddress.ip_address(peer)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address in PROXIES:
            return
        result = resolve_client_ip(peer, xff, PROXIES)
        assert classify(result.address) == classify(address)

    @settings(max_examples=300)
    @given(forged=st.lists(entries, max_size=10), client=addresses,
           hops=st.lists(st.sampled_from(["10.0.0.2", "10.0.0.3", "[2001:db8:1::5]:1"]),
                         max_size=5))
    def test_forged_prefix_never_changes_answer(
        self, forged: list[str], client: str, hops: list[str]
    ) -> None:
        """Whatever a client prepends to XFF, the result through trusted hops is the same."""
        if parse_address(client) in PROXIES:
            return
        honest = ", ".join([client, *hops])
        spoofed = ", ".join([*forged, client, *hops])
        a = resolve_client_ip("10.0.0.1", honest, PROXIES)
        b = resolve_client_ip("10.0.0.1", spoofed, PROXIES, max_bytes=100_000)
        assert a.address == b.address == parse_address(client)
