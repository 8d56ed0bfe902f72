"""The strict baseline: a plugin that replays a recorded sequence of PDK calls, arguments included,
and does nothing else. Against it, what remains of a plugin's cost is its own logic."""

from __future__ import annotations

import json
import sys
from typing import Any

from kong_mtls import schema
from kong_mtls.kong.runtime import phase
from kong_mtls.kong.server import serve

NAME = "replay"

Schema = [schema.string("calls", required=True)]  # JSON: [[method, [args...]], ...]


class Plugin:
    def __init__(self, config: dict) -> None:
        self.calls = [(method.split(".")[1:], args)
                      for method, args in json.loads(schema.validate(Schema, config)["calls"])]

    @phase(NAME)
    def access(self, kong: Any) -> None:
        for path, args in self.calls:
            target = kong
            for name in path:
                target = getattr(target, name)
            target(*args)


def main(argv=None) -> int:
    return serve(NAME, Plugin, Schema, argv, priority=1000)


if __name__ == "__main__":
    sys.exit(main())
