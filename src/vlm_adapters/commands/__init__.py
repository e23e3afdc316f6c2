"""Subcommands of the ``vlm-adapters`` CLI; each module defines ``add_parser(subparsers)``."""
