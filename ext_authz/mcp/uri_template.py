"""Resource URIs and URI templates (RFC 6570) as resource rules name them (pure, no I/O).

A rule's key is a URI (`repo://docs/readme`) or a template (`repo://{owner}/{name}`). A
template matches a URI when some expansion of it is that URI: `{name}` any text but `/`, `?`
and `#` (a simple expansion percent-encodes those), `{+name}` and `{#name}` any text, and
`{/a}`, `{.a}`, `{;a}`, `{?a}`, `{&a}` their optional prefixed parts. A URI is matched as
the caller sent it, byte for byte: a server that decodes or normalizes it (`%2F`, `..`,
case) may read one URI where a rule sees another, so hiding is surest with a hidden `"*"`
and the visible resources named.
"""

from __future__ import annotations

import re
from functools import lru_cache

_EXPRESSION = re.compile(r"\{([^{}]*)\}")
_VARIABLE = re.compile(r"^(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*"
                       r"(?::[1-9][0-9]{0,3}|\*)?$")
_LITERAL = re.compile(r"^[^\x00-\x20\x7f{}\"<>\\^`|]*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MAX_URI_RULE = 2048

# What each operator's expansion can be (RFC 6570 section 3.2), as a pattern.
_OPERATORS = {
    "": r"[^/?#]*",
    "+": r".*",
    "#": r"(?:#.*)?",
    ".": r"(?:\.[^/?#]*)*",
    "/": r"(?:/[^?#]*)?",
    ";": r"(?:;[^/?#]*)*",
    "?": r"(?:\?[^#]*)?",
    "&": r"(?:&[^#]*)?",
}


def is_template(key: str) -> bool:
    return "{" in key


def uri_rule_problem(key: str) -> str:
    """Why `key` is no URI or URI template a resource rule can name ("" when it is one)."""
    if not key or len(key) > MAX_URI_RULE:
        return f"a URI or URI template of 1-{MAX_URI_RULE} characters"
    if not _SCHEME.match(key):
        return "a URI or URI template starts with its scheme (`file:`, `repo://`)"
    literals = _EXPRESSION.split(key)[::2]
    if any(not _LITERAL.match(part) for part in literals):
        return "spaces, quotes, control characters and unpaired braces cannot be in a URI"
    for expression in _EXPRESSION.findall(key):
        operator = expression[:1] if expression[:1] in _OPERATORS else ""
        names = expression[len(operator):].split(",")
        if not all(_VARIABLE.match(name) for name in names):
            return f"{{{expression}}} is no RFC 6570 expression"
    return ""


@lru_cache(maxsize=4096)
def template_pattern(template: str) -> re.Pattern[str]:
    """What URIs `template` can expand to (a checked rule key)."""
    parts = []
    for index, piece in enumerate(_EXPRESSION.split(template)):
        if index % 2 == 0:
            parts.append(re.escape(piece))
        else:
            operator = piece[:1] if piece[:1] in _OPERATORS else ""
            parts.append(_OPERATORS[operator])
    return re.compile("".join(parts), re.DOTALL)
