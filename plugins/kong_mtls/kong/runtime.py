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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import greenlet

from kong_mtls.constants import LOG_METHOD_SUFFIXES, MESSAGE_UNEXPECTED, VERDICT_REPLAYABLE, verdict_slot

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


#: What ends a greenlet or the process: never taken for a handler's failure.
PROCESS_EXITS = (greenlet.GreenletExit, SystemExit, KeyboardInterrupt)


#: A PDK call as a path of attribute names from the `kong` object, and its arguments.
PdkCall = tuple[tuple[str, ...], tuple[Any, ...]]


def _refusal_calls(plugin: str, refusal: Refusal) -> list[PdkCall]:
    """The calls that log a refusal's reason, then answer it."""
    line = log_line(plugin, "refused", status=refusal.status, reason=refusal.reason, detail=refusal.detail)
    return [(("log", "warn" + LOG_METHOD_SUFFIXES.get(plugin, "")), (line,)),
            (("response", "exit"), (refusal.status, {"message": refusal.message}, dict(refusal.headers)))]


def _perform(kong: Any, calls: list[PdkCall]) -> None:
    for path, args in calls:
        target = kong
        for name in path:
            target = getattr(target, name)
        target(*args)


def refuse(kong: Any, plugin: str, refusal: Refusal) -> None:
    """Log the refusal's reason, then answer it. The caller must return right after."""
    _perform(kong, _refusal_calls(plugin, refusal))


def _method(names: Sequence[str]) -> str:
    """The PDK method a path of attribute names calls, as Kong resolves it: `kong.log.warn..` is
    `kong.log.warn` (see LOG_METHOD_SUFFIXES)."""
    return ".".join(part for name in ("kong", *names) for part in name.split(".") if part)


#: The PDK calls that only read. A handler's other calls change the request; with its declared
#: inputs, they are what the verdict cache replays.
PLAIN_READS = frozenset({
    "kong.client.get_consumer",
    "kong.client.get_credential",
    "kong.client.get_forwarded_ip",
    "kong.client.get_ip",
    "kong.client.load_consumer",
    "kong.client.tls.get_full_client_certificate_chain",
    "kong.ctx.shared.get",
    "kong.nginx.get_var",
    "kong.request.get_body",
    "kong.request.get_header",
    "kong.request.get_headers",
    "kong.request.get_method",
    "kong.request.get_query",
})


#: What each plain read a verdict may rest on needs among its inputs: the (kind, name) of the input
#: that holds the value read (the name of the read's first argument when None), or, for
#: `kong.request.get_headers`, an input of that kind (the handler names the lines that decided).
#: A consumer row needs none: each adapter bounds the verdict by the row's cache time. A verdict
#: resting on any other read (kong.ctx.shared, the credential, the query, the body ...) is not
#: offered, whatever the handler declared.
READ_INPUTS: dict[str, tuple[str, str | None] | None] = {
    "kong.nginx.get_var": ("var", None),
    "kong.client.get_forwarded_ip": ("var", "remote_addr"),
    "kong.request.get_method": ("var", "request_method"),
    "kong.client.tls.get_full_client_certificate_chain": ("chain", ""),
    "kong.request.get_headers": ("header", None),
    "kong.client.load_consumer": None,
}


class VerdictInputs:
    """What decided one request, as a handler declares it for the guard plugin's verdict cache
    (docs/guard.md#the-verdict-cache): every input the decision read, with the value read, and, once
    the handler knows that any request with the same values gets the same decision, for how long.
    A handler that never calls `holds_for` (or with 0) keeps the request out of the cache."""

    __slots__ = ("inputs", "ttl", "usable")

    def __init__(self) -> None:
        self.inputs: list[tuple[str, str, Any]] = []
        self.ttl = 0.0
        #: False once an input was not what Kong's functions return (text, or lines of text).
        self.usable = True

    def var(self, name: str, value: Any) -> None:
        """The nginx variable `name` (`kong.nginx.get_var`; `remote_addr` is Kong's forwarded IP)."""
        self._add("var", name, value)

    def header(self, name: str, lines: Any) -> None:
        """Every line of request header `name` (a value of Kong's `get_headers` map, or None)."""
        lines = [lines] if isinstance(lines, str) else lines
        if lines is not None and not (isinstance(lines, list) and all(isinstance(v, str) for v in lines)):
            self.usable = False
        self.inputs.append(("header", name.lower(), lines))

    def chain(self, pem: Any) -> None:
        """The client's certificate chain (`kong.client.tls.get_full_client_certificate_chain`)."""
        self._add("chain", "", pem)

    def holds_for(self, seconds: float) -> None:
        self.ttl = max(0.0, float(seconds))

    def _add(self, kind: str, name: str, value: Any) -> None:
        if value is not None and not isinstance(value, str):
            self.usable = False
        self.inputs.append((kind, name, value))

    def covers(self, method: str, args: tuple) -> bool:
        """Whether the plain read `method(*args)` is one these inputs hold (see READ_INPUTS)."""
        if method not in READ_INPUTS:
            return False
        need = READ_INPUTS[method]
        if need is None:
            return True
        kind, name = need
        if method == "kong.request.get_headers":
            return any(k == kind for k, _, _ in self.inputs)
        if name is None:
            name = args[0] if args and isinstance(args[0], str) else ""
        return any(k == kind and n == name for k, n, _ in self.inputs)


class _Calls:
    """The PDK calls of one handler run, in order (plain reads too), and the changes not yet sent
    to Kong: while `holding` (from the start), a call Kong's wrapper can make (VERDICT_REPLAYABLE)
    is only noted, for the wrapper to make from the verdict. Any other call (a read, or a change the
    wrapper cannot make) is made at once, after the held ones, if any, are sent (which ends the
    holding): the handler reads what its own changes left, and gets Kong's answer to every call
    not held."""

    __slots__ = ("held", "holding", "made")

    def __init__(self) -> None:
        self.made: list[tuple[str, tuple]] = []
        self.held: list[tuple[Any, tuple]] = []
        self.holding = True

    def send_held(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for function, args in held:
            function(*args)


class _Recording:
    """Kong's PDK object, noting each call in `calls` once it returned (or holding it there)."""

    __slots__ = ("_calls", "_names", "_target")

    def __init__(self, target: Any, names: tuple[str, ...], calls: _Calls) -> None:
        self._target = target
        self._names = names
        self._calls = calls

    def __getattr__(self, name: str) -> _Recording:
        return _Recording(getattr(self._target, name), (*self._names, name), self._calls)

    def __call__(self, *args: Any) -> Any:
        method, calls = _method(self._names), self._calls
        if calls.holding and method in VERDICT_REPLAYABLE:
            calls.held.append((self._target, args))
            calls.made.append((method, args))
            return None
        if calls.held:
            calls.send_held()
        result = self._target(*args)
        calls.made.append((method, args))
        return result


def _leave_verdict(kong: Any, plugin: str, inputs: VerdictInputs, calls: _Calls,
                   answer: list[PdkCall]) -> bool:
    """Leave the verdict where the guard plugin's wrapper (verdicts.lua) takes it, with one
    `kong.ctx.shared.set`: the calls that change the request (and the refusal's `answer`), for the
    wrapper to apply to this request when the handler held them back (`apply`), and to replay for
    later requests when every read the handler made is one of its declared inputs (READ_INPUTS)
    and it declared how long they decide (`ttl`). Every change must be one the wrapper replays.
    Returns whether the verdict was left."""
    changes = [(method, args) for method, args in calls.made if method not in PLAIN_READS]
    changes += [(_method(path), args) for path, args in answer]
    if any(method not in VERDICT_REPLAYABLE for method, _ in changes):
        return False
    cacheable = (inputs.ttl > 0 and inputs.usable and bool(inputs.inputs) and bool(changes)
                 and all(inputs.covers(method, args) for method, args in calls.made if method in PLAIN_READS))
    if not (cacheable or (calls.holding and changes)):
        return False
    record: dict[str, Any] = {
        "ttl": inputs.ttl if cacheable else 0,
        "inputs": [list(item) for item in inputs.inputs] if cacheable else [],
        "calls": [[method, list(args), len(args)] for method, args in changes],
    }
    if calls.holding:
        record["apply"] = True
    kong.ctx.shared.set(verdict_slot(plugin), record)
    return True


#: True on a plugin instance whose config carries VERDICT_APPLY_FLAG (kong_mtls.kong.server).
VERDICT_APPLIED_ATTRIBUTE = "verdicts_applied_by_kong"


def phase(plugin: str, *,
          verdicts: bool = False) -> Callable[[Callable[..., PhaseResult]], Callable[[Any, Any], None]]:
    """Decorate a phase method `(self, kong) -> Refusal | None` so that nothing escapes it.

    With `verdicts`, the method is `(self, kong, inputs: VerdictInputs)`. Only on an instance whose
    verdicts Kong's wrapper applies (VERDICT_APPLIED_ATTRIBUTE) is a verdict left: `kong` then
    notes the calls that change the request and holds back those the wrapper can make, a refusal's
    log line and answer are added to them, and the verdict carries them all (also to the verdict
    cache while `verdict_cache_ttl` is not 0): the request costs its reads and one call (see
    `_Calls` for what ends the holding). On any other instance every call is made at once and no
    verdict is left (no one would take it)."""

    def decorate(handler: Callable[..., PhaseResult]) -> Callable[[Any, Any], None]:
        @functools.wraps(handler)
        def safe_handler(self: Any, kong: Any) -> None:
            try:
                notices = getattr(self, START_NOTICES_ATTRIBUTE, ())
                if notices:  # (a request that logs them is not offered to the verdict cache)
                    setattr(self, START_NOTICES_ATTRIBUTE, ())  # once, even with concurrent events
                    for level, line in notices:
                        pdk_log(kong, plugin, level, line)
                config_error = getattr(self, CONFIG_ERROR_ATTRIBUTE, None)
                if config_error is not None:
                    refuse(kong, plugin, Refusal(500, MESSAGE_UNEXPECTED, REASON_INVALID_CONFIG,
                                                 detail=str(config_error)))
                    return
                if not (verdicts and not notices and getattr(self, VERDICT_APPLIED_ATTRIBUTE, False)):
                    refusal = handler(self, kong, VerdictInputs()) if verdicts else handler(self, kong)
                    if refusal is not None:
                        refuse(kong, plugin, refusal)
                    return
                inputs = VerdictInputs()
                calls = _Calls()
                refusal = handler(self, _Recording(kong, (), calls), inputs)
                answer = [] if refusal is None else _refusal_calls(plugin, refusal)
                if calls.holding and _leave_verdict(kong, plugin, inputs, calls, answer):
                    return  # Kong's wrapper makes every change, and the answer
                calls.send_held()
                # Before the answer: after kong.response.exit, Kong takes no more calls for the request.
                _leave_verdict(kong, plugin, inputs, calls, answer)
                _perform(kong, answer)
            except PROCESS_EXITS:
                raise
            except BaseException as exc:  # the point of this wrapper (a stray gevent.Timeout too)
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
