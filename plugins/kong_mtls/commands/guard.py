"""`kong-mtls guard`: print the fail-closed guard's plugin entry (or its post-function fallback)."""

from __future__ import annotations

import argparse
import json

from kong_mtls.cli import CommandError
from kong_mtls.guard import GUARDED_PLUGINS, guard_plugin, lua_guard


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "guard", help="print the fail-closed guard's plugin entry (kong-mtls-guard, or a post-function)",
        description="Kong lets requests through when a plugin server fails; the guard refuses them "
                    "(503) unless every required kong-mtls plugin vouched for the request. Without "
                    "PLUGIN: the kong-mtls-guard entry in auto mode (every kong-mtls plugin Kong "
                    "runs for the request; enable it once, globally). With PLUGINs: a guard that "
                    "requires exactly those. --post-function: the same check as code for Kong's "
                    "bundled post-function, for a Kong that cannot load the guard's Lua files.")
    parser.add_argument("plugins", nargs="*", metavar="PLUGIN",
                        help=f"zero or more of: {', '.join(GUARDED_PLUGINS)}")
    parser.add_argument("--post-function", action="store_true",
                        help="print the post-function fallback (needs PLUGINs; no auto mode)")
    parser.add_argument("--format", choices=("yaml", "json", "lua"), default="yaml",
                        help="yaml: a plugin entry for kong.yml (default); json: the same for the Admin "
                             "API; lua: the post-function code only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "lua" and not args.post_function:
        raise CommandError("--format lua goes with --post-function")
    try:
        if args.post_function:
            code = lua_guard(args.plugins)
            entry: dict = {"name": "post-function", "config": {"access": [code]}}
        else:
            entry = guard_plugin(args.plugins)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if args.format == "json":
        print(json.dumps(entry, indent=2))
    elif args.format == "lua":
        print(code, end="")
    elif args.post_function:
        indented = "".join(f"          {line}\n" for line in code.splitlines())
        print("- name: post-function\n  config:\n    access:\n      - |\n" + indented, end="")
    else:
        print(_plugin_yaml(entry), end="")
    return 0


def _plugin_yaml(entry: dict) -> str:
    """The entry as a kong.yml list item (names are plain YAML scalars: letters and dashes)."""
    lines = [f"- name: {entry['name']}\n"]
    if "config" in entry:
        lines.append(f"  config:\n    require: [{', '.join(entry['config']['require'])}]\n")
    else:
        lines.append("  # auto: every kong-mtls plugin Kong runs for the request must vouch for it\n")
    return "".join(lines)
