"""`kong-mtls`: the operator command line. Each subcommand lives in `kong_mtls.commands.<name>`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules under kong_mtls.commands; each has `register(subparsers)` that adds its parser and sets
#: `func(args) -> int` as the parser default.
COMMAND_MODULES = (
    "dev_pki",
    "check",
    "api_keys",
    "cloudflare",
    "upstream_check",
    "guard",
    "lint",
)


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit code 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kong-mtls", description=__doc__.split(":", 1)[1].strip())
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"kong_mtls.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"kong-mtls {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
