"""Fresh names for hidden items, sealed so that any answer can have the caller's put back.

A hidden tool's call (a prompt's get, a resource's read) goes to the server under a fresh
name that no server has, so the server itself answers for an unknown one. The fresh name
carries the caller's name and a MAC under the gateway's key: whichever answer the name comes
back in (the call's own, another request's that the server crossed it into, the GET stream,
a replay after a resumption), the answers filter puts the caller's name back, and no fresh
name leaves the gateway. No state: one key, shared by a sidecar's workers, restores them all.
Only names this key sealed are restored (a caller cannot forge one).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re

_TAG_BYTES = 12
# The names are lowercase letters, digits and "-": no JSON writer escapes them, and a
# resource's is a URI (`urn:`) that every URI parser takes.
_SEALED = re.compile(rb"(urn:)?hidden-([0-9a-f]*)-([0-9a-f]{%d})(?![0-9a-f])" % (2 * _TAG_BYTES))
MARK = b"hidden-"  # in every fresh name: an answer without it has none to put back


class Sealer:
    """Makes and opens fresh names under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a sealing key has at least 16 bytes")
        self._key = key

    def _tag(self, kind: str, name: bytes) -> str:
        return hmac.new(self._key, kind.encode() + b"\0" + name, hashlib.sha256).digest()[
            :_TAG_BYTES].hex()

    def fresh(self, kind: str, name: str) -> str:
        """The fresh name a hidden item of this kind ("tool", "prompt", "resource") and
        name goes to the server under."""
        raw = name.encode("utf-8", "surrogatepass")
        token = f"hidden-{raw.hex()}-{self._tag(kind, raw)}"
        return f"urn:{token}" if kind == "resource" else token

    def restore(self, data: bytes, *, escape: bool = True) -> bytes:
        """`data` with every fresh name this key sealed replaced by the caller's name:
        JSON-escaped (`escape`, inside JSON strings) or as it is (plain text)."""
        if MARK not in data:
            return data
        return _SEALED.sub(lambda match: self._opened(match, escape), data)

    def _opened(self, match: re.Match[bytes], escape: bool) -> bytes:
        prefix, name_hex, tag = match.groups()
        raw = bytes.fromhex(name_hex.decode()) if len(name_hex) % 2 == 0 else None
        for kind in ("resource", "tool", "prompt"):
            if raw is not None and hmac.compare_digest(self._tag(kind, raw), tag.decode()):
                name = raw.decode("utf-8", "surrogatepass")
                text = json.dumps(name, ensure_ascii=False)[1:-1] if escape else name
                # A resource's whole URI is the caller's; another's `urn:` is not its own.
                kept = b"" if kind == "resource" or prefix is None else prefix
                return kept + text.encode("utf-8", "surrogatepass")
        return match.group(0)  # not one of ours: as it was
