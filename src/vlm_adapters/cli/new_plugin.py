"""``vlm-adapters new-plugin``: scaffold a plugin package with a working stub component of
each kind asked for."""

from __future__ import annotations

import argparse
from typing import Any

from vlm_adapters.cli import COMMANDS
from vlm_adapters.scaffold import KINDS, new_plugin


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "new-plugin",
        help=COMMANDS["new-plugin"],
        description="Write OUT/vlm-adapters-NAME: a package with a stub component of each "
        "--kind, e.g. `new-plugin acme --kind connector --name window_mlp --kind llm --name "
        "tiny_lm`.",
    )
    parser.add_argument("name", help="Package name, e.g. my-connector (lower case).")
    parser.add_argument(
        "--kind",
        action="append",
        required=True,
        choices=KINDS,
        help="Component family; repeat it for a package with several kinds.",
    )
    parser.add_argument(
        "--name",
        action="append",
        dest="components",
        metavar="COMPONENT",
        help="Name of the component (what configs write after `type:`), one per --kind in the "
        "same order; default: the package name.",
    )
    parser.add_argument(
        "--out", default=".", help="Parent directory; the package goes to OUT/vlm-adapters-NAME."
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = new_plugin(args.name, args.kind, args.out, components=args.components)
    print(f"wrote {target}")
    print(f"next: pip install -e {target} && pytest {target}")
    return 0
