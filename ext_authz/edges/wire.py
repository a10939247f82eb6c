"""Protobuf wire format, written by hand for the few bytes each check adds to a template.

A CheckResponse is its reason's constant template plus per-check parts. Protobuf lets them
be concatenated: fields may come in any order, and a message field that appears twice is
merged, its repeated fields appended (tests decode the result with the generated classes
and with envoy-data-plane's independent implementation).
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """An unsigned varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """A LEN field: tag, length, payload."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


def struct_entry(key: str, value: str) -> bytes:
    """One `fields` entry of a google.protobuf.Struct, holding a string Value."""
    # Struct: map<string, Value> fields = 1; Value.string_value = 3.
    entry = length_delimited(1, key.encode()) + length_delimited(
        2, length_delimited(3, value.encode()))
    return length_delimited(1, entry)


def short_struct_entry(prefix: bytes, value: str) -> bytes:
    """`struct_entry` unrolled for a key whose encoding is `prefix` and a short ASCII value,
    so that every length fits in one varint byte (the one per-check field)."""
    data = value.encode()
    size = len(data)
    assert size < 100, "short values only"
    return (b"\x0a" + bytes((size + len(prefix) + 3,)) + prefix + bytes((size + 2,)) + b"\x1a"
            + bytes((size,)) + data)
