"""Options and KEY=VALUE overrides after a command's positional argument, in any order."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def parse_rest(
    args: argparse.Namespace,
    prog: str,
    add_options: Callable[[argparse.ArgumentParser], None],
) -> argparse.Namespace:
    """``args`` with the options (those of ``add_options``) and the ``overrides`` found in
    ``args.rest``, what the command line holds after the positional argument."""
    parser = argparse.ArgumentParser(prog=prog)
    add_options(parser)
    parser.add_argument("overrides", nargs="*")
    parser.set_defaults(**{k: v for k, v in vars(args).items() if k != "rest"})
    return parser.parse_intermixed_args(args.rest)
