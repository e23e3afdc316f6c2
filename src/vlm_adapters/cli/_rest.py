"""Options and KEY=VALUE overrides after a command's positional argument, in any order; the
argparse types the commands share."""

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


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; use 1 or more")
    return value
