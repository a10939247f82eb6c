"""`diff OLD NEW`: who gains or loses which server, tool, prompt or resource."""

from __future__ import annotations

import argparse
import json
import sys

from ..policy.compile import Policy
from ..policy.diff import PolicyDiff, diff
from .common import EXIT_FAILED, EXIT_OK, Commands, load

ARROW = {("hidden", "visible"): "gains", ("absent", "visible"): "gains",
         ("visible", "hidden"): "loses", ("visible", "absent"): "loses"}
CREDENTIAL = {"gateway": "the gateway's own token (oauth2)",
              "exchanged": "each caller's, exchanged (token_exchange)",
              "caller": "each caller's own, passed on"}


def report(found: PolicyDiff) -> str:
    """The text `diff` prints: what widens access for external callers first, marked `!`."""
    if not found:
        return "no change in who sees what\n"
    widening = sum(c.widens_external for c in found.changes) + sum(
        m.widens_external for m in found.memberships)
    lines = [f"{len(found.changes)} change(s) in who sees what,"
             f" {len(found.memberships)} in who belongs where;"
             f" {widening} widen(s) what external callers see"
             + (f"; {len(found.credentials)} in what upstreams get" if found.credentials
                else "")]
    width = max((len(c.caller) for c in found.changes), default=0)
    for change in found.changes:
        before, after = change.before, change.after
        rule = after.rule if after.seen != "absent" else f"{before.rule}, now gone"
        lines.append(f"{'!' if change.widens_external else ' '} {change.caller:<{width}}"
                     f"  {ARROW[before.seen, after.seen]}  {change.item.label}"
                     f"  ({before.seen} -> {after.seen}; {rule or 'not configured'})")
    for member in found.memberships:
        said = [f"adds {', '.join(member.added)}"] if member.added else []
        said += [f"removes {', '.join(member.removed)}"] if member.removed else []
        lines.append(f"{'!' if member.widens_external else ' '} {member.key} {member.what}:"
                     f" {'; '.join(said)}")
    for credential in found.credentials:
        lines.append(f"  servers.{credential.server} upstream Authorization:"
                     f" {CREDENTIAL[credential.before]} -> {CREDENTIAL[credential.after]}")
    return "\n".join(lines) + "\n"


def cmd_diff(args: argparse.Namespace) -> int:
    # A config under review needs no secret: unset ${VAR}s and secret files are not read.
    old = Policy.from_config(load(args.old, secrets=False))
    new = Policy.from_config(load(args.new, secrets=False))
    found = diff(old, new)
    if args.json:
        sys.stdout.write(json.dumps(found.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(report(found))
    return EXIT_FAILED if args.fail_on_widening and found.widens_external else EXIT_OK


def add_parser(commands: Commands) -> None:
    """The `diff` command's flags."""
    command = commands.add_parser(
        "diff", help="who gains or loses which server, tool, prompt or resource between two"
                     " configs (exit 2 if either is invalid)")
    command.add_argument("old", metavar="OLD", help="the config in force")
    command.add_argument("new", metavar="NEW", help="the config proposed")
    command.add_argument("--json", action="store_true", help="print JSON for machines")
    command.add_argument("--fail-on-widening", action="store_true",
                         help="exit 1 when anything becomes visible to external callers"
                              " (a CI gate)")
    command.set_defaults(func=cmd_diff)
