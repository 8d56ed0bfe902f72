"""A plugin served by kong-pdk's own dedicated server, without our wrapper or server: shows why
they exist. Its handler raises before its first PDK call, which wedges kong-pdk's server (the
event lock is never released); with `fail_init` in its config its constructor raises, so
StartInstance fails, which Kong before 3.9 answers by letting the request through.
"""

from __future__ import annotations

from kong_pdk.cli import start_dedicated_server

NAME = "unwrapped"


class Plugin:
    def __init__(self, config: dict) -> None:
        if config.get("fail_init"):
            raise ValueError("invalid config")
        self.config = config

    def access(self, kong) -> None:
        if kong is not None:
            raise RuntimeError("boom before the first PDK call")


if __name__ == "__main__":
    start_dedicated_server(NAME, Plugin, "0.1.0", 1000, [])
