"""A recording stand-in for Kong's PDK object, to run an adapter in-process: every call by its
dotted name (without the leading `kong.`), in order; `kong.ctx.shared` kept as a dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SET_SHARED = "ctx.shared.set"


class ConnectionGone(OSError):
    """What a PDK call raises when Kong's side of the socket is gone."""


class RecordingKong:
    """The PDK calls an adapter makes, recorded in order; `answers` maps a dotted name to a callable
    giving its result; `fail` names a call that raises `ConnectionGone`."""

    def __init__(self, answers: dict[str, Callable[..., Any]], fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.shared: dict[str, Any] = {}
        self.shared_keys: list[str] = []
        self._answers = answers
        self._fail = fail

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        if name == self._fail:
            raise ConnectionGone("plugin-server connection lost")
        if name == SET_SHARED:
            self.shared[args[0]] = args[1]
            self.shared_keys.append(args[0])
            return None
        if name == "ctx.shared.get":
            return self.shared.get(args[0])
        answer = self._answers.get(name)
        return answer(*args) if answer is not None else None

    def __getattr__(self, attr: str) -> Any:
        return _Path(self, attr)


class _Path:
    def __init__(self, kong: RecordingKong, name: str) -> None:
        self._kong = kong
        self._name = name

    def __getattr__(self, attr: str) -> _Path:
        return _Path(self._kong, f"{self._name}.{attr}")

    def __call__(self, *args: Any) -> Any:
        return self._kong._call(self._name, *args)
