"""``vlm-adapters new-plugin``: scaffold a plugin package with a working stub component."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.scaffold import KINDS, new_plugin


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "new-plugin",
        help="Write a ready-to-install plugin package (pyproject, stub component, tests).",
    )
    parser.add_argument("name", help="Component name, e.g. my-connector (lower case).")
    parser.add_argument("--kind", required=True, choices=KINDS, help="Component family.")
    parser.add_argument(
        "--out", default=".", help="Parent directory; the package goes to OUT/vlm-adapters-NAME."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = new_plugin(args.name, args.kind, args.out)
    print(f"wrote {target}")
    print(f"next: pip install -e {target} && pytest {target}")
    return 0
