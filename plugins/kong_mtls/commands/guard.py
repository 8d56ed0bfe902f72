"""`kong-mtls guard`: print the post-function Lua that makes a route fail closed."""

from __future__ import annotations

import argparse
import json

from kong_mtls.cli import CommandError
from kong_mtls.guard import GUARDED_PLUGINS, lua_guard


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "guard", help="print the fail-closed guard for a route's post-function plugin",
        description="Print the Lua for Kong's bundled post-function plugin (access phase) that refuses a "
                    "request unless every listed kong-mtls plugin vouched for it. Kong lets requests "
                    "through when a plugin server fails; this guard closes that door.")
    parser.add_argument("plugins", nargs="+", metavar="PLUGIN",
                        help=f"one or more of: {', '.join(GUARDED_PLUGINS)}")
    parser.add_argument("--format", choices=("lua", "yaml", "json"), default="lua",
                        help="lua: the code only; yaml/json: a ready post-function plugin entry")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        code = lua_guard(args.plugins)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if args.format == "lua":
        print(code, end="")
    elif args.format == "json":
        print(json.dumps({"name": "post-function", "config": {"access": [code]}}, indent=2))
    else:
        indented = "".join(f"          {line}\n" for line in code.splitlines())
        print("- name: post-function\n  config:\n    access:\n      - |\n" + indented, end="")
    return 0
