"""What every plugin adapter shares: refusals, the safe phase wrapper, logging.

Kong fails open when a Python plugin errors, and kong-pdk 0.36 wedges its whole server when a
handler raises before its first PDK call. So no exception may leave a phase handler: the wrapper
turns one into a 500 `{"message": "An unexpected error occurred"}` with the reason in the log.
Handlers never call `kong.response.exit` themselves; they return a `Refusal`, and the wrapper
answers it and returns at once (code after `exit` would otherwise keep running).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from kong_mtls.constants import LOG_METHOD_SUFFIXES, MESSAGE_UNEXPECTED

#: Our own log lines carry this tag, then `plugin=... reason=...` pairs, so they can be grepped.
LOG_TAG = "[kong-mtls]"

#: Reason code logged when a handler raised.
REASON_UNEXPECTED = "UNEXPECTED_ERROR"
#: Reason code logged for every request of an instance whose config could not be used.
REASON_INVALID_CONFIG = "INVALID_CONFIG"

#: Set on a plugin instance whose config was refused (see `kong_mtls.kong.server`).
CONFIG_ERROR_ATTRIBUTE = "config_error"
#: A plugin instance may hold `(level, line)` pairs from its start here (an expiring trust anchor,
#: say). Kong logs a plugin server's own output at `info`, hidden at its default level `notice`, so
#: the wrapper writes them through the PDK, at their level, on the instance's first request.
START_NOTICES_ATTRIBUTE = "start_notices"

_stderr_log = logging.getLogger("kong_mtls")


@dataclass(frozen=True)
class Refusal:
    """An answer to the client instead of proxying: status, public message, and a logged reason."""

    status: int
    message: str
    reason: str
    detail: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


#: A phase handler returns a refusal, or None to let the request go on.
PhaseResult = Optional[Refusal]


def log_line(plugin: str, event: str, **fields: Any) -> str:
    """One grep-able line: `[kong-mtls] client-cert-auth refused reason=CERT_EXPIRED ...`."""
    parts = [LOG_TAG, plugin, event]
    parts.extend(f"{k}={_log_value(v)}" for k, v in fields.items() if v not in (None, ""))
    return " ".join(parts)


def _log_value(value: Any) -> str:
    """One log field: at most 300 characters, and nothing a terminal or a log parser would act on
    (control and other non-printable characters, from a certificate subject say, are escaped). A
    value with a space, `=`, `"` or `\\` is quoted with `"` and `\\` escaped inside, so a subject
    like `CN=x" reason=OK` cannot forge another field."""
    text = str(value)
    if len(text) > 300:
        text = text[:300] + "..."
    text = printable(text)
    if any(c in text for c in ' "=\\'):  # quoted, and nothing inside can end the quotes
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def printable(text: str) -> str:
    """`text` with every non-printable character (control characters, escape sequences a terminal or
    a log parser would act on) written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def pdk_log(kong: Any, plugin: str, level: str, line: str) -> None:
    """`kong.log.<level>(line)` in Kong's error log, under the plugin's own `[name]` (see
    `LOG_METHOD_SUFFIXES`)."""
    getattr(kong.log, level + LOG_METHOD_SUFFIXES.get(plugin, ""))(line)


def refuse(kong: Any, plugin: str, refusal: Refusal) -> None:
    """Log the refusal's reason, then answer it. The caller must return right after."""
    pdk_log(kong, plugin, "warn", log_line(plugin, "refused", status=refusal.status,
                                           reason=refusal.reason, detail=refusal.detail))
    kong.response.exit(refusal.status, {"message": refusal.message}, dict(refusal.headers))


def phase(plugin: str) -> Callable[[Callable[[Any, Any], PhaseResult]], Callable[[Any, Any], None]]:
    """Decorate a phase method `(self, kong) -> Refusal | None` so that nothing escapes it."""

    def decorate(handler: Callable[[Any, Any], PhaseResult]) -> Callable[[Any, Any], None]:
        @functools.wraps(handler)
        def safe_handler(self: Any, kong: Any) -> None:
            try:
                notices = getattr(self, START_NOTICES_ATTRIBUTE, ())
                if notices:
                    setattr(self, START_NOTICES_ATTRIBUTE, ())  # once, even with concurrent events
                    for level, line in notices:
                        pdk_log(kong, plugin, level, line)
                config_error = getattr(self, CONFIG_ERROR_ATTRIBUTE, None)
                if config_error is not None:
                    refuse(kong, plugin, Refusal(500, MESSAGE_UNEXPECTED, REASON_INVALID_CONFIG,
                                                 detail=str(config_error)))
                    return
                refusal = handler(self, kong)
                if refusal is not None:
                    refuse(kong, plugin, refusal)
                return
            except Exception as exc:  # the point of this wrapper
                _answer_unexpected(kong, plugin, exc)

        return safe_handler

    return decorate


def _answer_unexpected(kong: Any, plugin: str, exc: BaseException) -> None:
    reason = f"{type(exc).__name__}: {exc}"
    _stderr_log.error(log_line(plugin, "error", reason=REASON_UNEXPECTED, detail=reason), exc_info=exc)
    try:
        pdk_log(kong, plugin, "err", log_line(plugin, "error", reason=REASON_UNEXPECTED, detail=reason))
        kong.response.exit(500, {"message": MESSAGE_UNEXPECTED}, {})
    except Exception:  # Kong is unreachable: its side fails open, the guard catches it
        _stderr_log.exception(log_line(plugin, "error", reason="PDK_UNREACHABLE"))


def configure_stderr_logging(verbose: bool = False) -> None:
    """Plugin-server output goes to stderr, which Kong merges into its error log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    _stderr_log.addHandler(handler)
    _stderr_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    _stderr_log.propagate = False
