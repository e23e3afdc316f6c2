"""``vlm-adapters list``: every registered component with its provider, and every plugin
package with its version and status."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.plugins import list_components, list_plugins


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "list",
        help=COMMANDS["list"],
        description="The components table, then each plugin package with its version and "
        "status (loaded, failed, incompatible or disabled) and why it is not loaded.",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print a JSON list of objects: components ({kind, name, provider, description}) "
        "or, with --plugins, plugin packages ({package, version, status, reason, entry_points, "
        "components}).",
    )
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--kind", choices=["vision", "connector", "llm"], help="Only this kind.")
    view.add_argument(
        "--plugins", action="store_true", help="Only the plugin packages and their status."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(list_plugins() if args.plugins else list_components(args.kind), indent=2))
        return 0
    if not args.plugins:
        _print_components(list_components(args.kind))
    if args.kind is None:
        _print_plugins(list_plugins(), heading=not args.plugins)
    return 0


def _print_components(rows: list[dict[str, str]]) -> None:
    width = max((len(r["name"]) for r in rows), default=4)
    pwidth = max((len(r["provider"]) for r in rows), default=8)
    for row in rows:
        name, provider = row["name"], row["provider"]
        print(f"{row['kind']:<10} {name:<{width}}  {provider:<{pwidth}}  {row['description']}")


def _print_plugins(rows: list[dict[str, Any]], heading: bool) -> None:
    if heading:
        print("\nplugin packages:")
    width = max((len(r["package"]) for r in rows), default=7)
    vwidth = max((len(r["version"]) for r in rows), default=7)
    for row in rows:
        names = row["components"]
        detail = row["reason"] or (
            ", ".join(names) if len(names) <= 3 else f"{len(names)} components"
        )
        line = f"{row['package']:<{width}}  {row['version'] or '?':<{vwidth}}  {row['status']:<12}"
        print(f"{line}  {detail}".rstrip())
