"""``vlm-adapters list``: every registered component with its provider."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vlm_adapters.plugins import list_components


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("list", help="List vision backbones, connectors and LLM backends.")
    parser.add_argument("--json", action="store_true", help="Print a JSON list of objects.")
    parser.add_argument("--kind", choices=["vision", "connector", "llm"], help="Only this kind.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = list_components(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    pwidth = max((len(r["provider"]) for r in rows), default=8)
    for row in rows:
        name, provider = row["name"], row["provider"]
        print(f"{row['kind']:<10} {name:<{width}}  {provider:<{pwidth}}  {row['description']}")
    return 0
