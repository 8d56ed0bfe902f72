"""IP addresses, CIDR sets and client-address resolution for the ip-allowlist plugin (pure).

Three pieces:

* parsing: `parse_ip` (one address, strict), `parse_forwarded_address` (one element of a proxy
  header, which may carry a port), `parse_network` (config CIDRs). IPv4-mapped IPv6 addresses and
  networks (`::ffff:192.0.2.1`, `::ffff:192.0.2.0/120`) are turned into IPv4 everywhere, so one
  IPv4 rule covers a client whichever way the socket reports it.
* `AddressSet`: CIDRs compiled once into sorted, merged, disjoint integer intervals per family; a
  lookup is one `bisect` over them, so 10,000 CIDRs cost about what 10 do (see bench/core_cidr.py).
* `Policy.decide`: which address is the client's (`peer`, `forwarded` or a trusted `header`),
  whether it may pass, and a typed `Decision` with a stable `Reason`. Request-time input that is
  missing, malformed or sent by an untrusted peer is refused, never allowed and never published.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Union

from kong_mtls.schema import ConfigError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The header whose value is a comma-separated hop list (`client, proxy1, proxy2`).
X_FORWARDED_FOR = "X-Forwarded-For"

#: Default refusal message, mirroring Kong 3.9's ip-restriction (kong/plugins/ip-restriction/handler.lua:
#: `IP address not allowed: <remote_addr>` when `message` is unset).
DEFAULT_MESSAGE = "IP address not allowed: {address}"
#: Default refusal message when there is no IP address to name (e.g. a unix-socket peer).
NO_ADDRESS_MESSAGE = "Cannot identify the client IP address"

#: Header lines read per request (`kong.request.get_headers(max)`; Kong allows at most 1000). A
#: request with more cannot be read whole, so it is refused: the lines beyond the limit could be the
#: ones a trusted proxy added.
MAX_HEADER_LINES = 1000
_MAX_ADDRESS_TEXT = 64  # longer than any IP literal (with brackets and port); anything longer is junk
_DETAIL_VALUE_CHARS = 64


def whole_header_map(headers: object, limit: int = MAX_HEADER_LINES) -> Mapping[str, Any] | None:
    """Kong's `get_headers(limit)` map, or None when it is no map or may have been cut at the limit
    (a line a trusted proxy added could be among those not returned)."""
    if not isinstance(headers, Mapping):
        return None
    if sum(len(v) if isinstance(v, list) else 1 for v in headers.values()) >= limit:
        return None
    return headers


class Source(str, Enum):
    """Which address the allow/deny lists are checked against."""

    PEER = "peer"            # the TCP peer, before any real-IP rewrite (nginx $realip_remote_addr)
    FORWARDED = "forwarded"  # Kong's resolved client IP (after trusted_ips / real_ip_header)
    HEADER = "header"        # a named header, trusted only from a peer in trusted_proxies


class Reason(str, Enum):
    """Stable reason codes, logged with every refusal."""

    ALLOWED = "ALLOWED"
    NO_ADDRESS = "NO_ADDRESS"                        # the address to check is missing or not an IP
    PEER_NOT_TRUSTED = "PEER_NOT_TRUSTED"            # header source, peer outside trusted_proxies
    UNTRUSTED_PEER_HEADER = "UNTRUSTED_PEER_HEADER"  # the header sent by a peer outside trusted_proxies
    HEADER_MISSING = "HEADER_MISSING"                # a trusted proxy did not send the header
    HEADER_MALFORMED = "HEADER_MALFORMED"            # the header value used is not a clean address list
    HEADER_TOO_FEW_HOPS = "HEADER_TOO_FEW_HOPS"      # X-Forwarded-For shorter than forwarded_for_hops
    UNTRUSTED_HOP = "UNTRUSTED_HOP"                  # an X-Forwarded-For hop to the right is not trusted
    ADDRESS_DENIED = "ADDRESS_DENIED"                # the client address matches `deny`
    ADDRESS_NOT_ALLOWED = "ADDRESS_NOT_ALLOWED"      # `allow` is set and the client address is not in it


class AddressError(ValueError):
    """Text that is not a usable IP address or CIDR (config or ranges file)."""


# -- parsing -----------------------------------------------------------------------------------------

def parse_ip(text: object) -> IPAddress | None:
    """One IP literal, strictly (no brackets, port, zone or surrounding space), or None.

    IPv4 octets with leading zeros are refused (ambiguous: octal to some parsers); IPv4-mapped IPv6
    comes back as IPv4.
    """
    parsed = _parse_ip(text) if isinstance(text, str) else None
    return parsed[0] if parsed else None


def parse_forwarded_address(text: str) -> IPAddress | None:
    """One element of a proxy header: `ip`, `ipv4:port`, `[ipv6]` or `[ipv6]:port`, or None."""
    parsed = _parse_forwarded(text)
    return parsed[0] if parsed else None


# An address with its normalised text.
_Parsed = tuple[IPAddress, str]


def _parse_ip(text: str) -> _Parsed | None:
    if not text or len(text) > _MAX_ADDRESS_TEXT:
        return None
    return _parse_short(text)


# Parsing and printing an address with `ipaddress` costs a few microseconds; the same peers and
# clients come back request after request, so results are memoised. The cache is bounded in
# entries and (by the length check above) in key size: header values are attacker-controlled.
@lru_cache(maxsize=4096)
def _parse_short(text: str) -> _Parsed | None:
    if not text.isascii():
        return None
    try:
        address: IPAddress = ipaddress.IPv6Address(text) if ":" in text else ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if address.version == 4:
        # The canonical form differs from the input exactly when an octet has a leading zero.
        return (address, text) if str(address) == text else None
    if address.scope_id is not None:
        return None
    mapped = address.ipv4_mapped
    if mapped is not None:
        return mapped, str(mapped)
    return address, str(address)


def _parse_forwarded(text: str) -> _Parsed | None:
    text = text.strip(" \t")
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return None
        inner = text[1:end]
        return _parse_ip(inner) if ":" in inner else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return _parse_ip(host) if _is_port(port) else None
    return _parse_ip(text)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and 0 < int(text) <= 65535


def parse_network(text: object) -> IPNetwork:
    """An address (`192.0.2.1`, a /32 or /128) or a CIDR (`192.0.2.0/24`) from config.

    Raises AddressError for anything else, including a CIDR with host bits set (`10.1.2.3/8` is
    more likely a typo than a wish for 10.0.0.0/8).
    """
    if not isinstance(text, str) or not text.isascii() or not text or len(text) > _MAX_ADDRESS_TEXT:
        raise AddressError(f"{text!r} is not an IP address or CIDR")
    host, slash, prefix_text = text.partition("/")
    address = _config_address(host, text)
    bits = 32 if isinstance(address, ipaddress.IPv4Address) else 128
    if not slash:
        prefix = bits
    elif prefix_text.isdigit() and len(prefix_text) <= 3 and int(prefix_text) <= bits:
        prefix = int(prefix_text)
    else:
        raise AddressError(f"{text!r}: prefix length must be a number from 0 to {bits}")
    try:
        network = ipaddress.ip_network((address, prefix))
    except ValueError:
        suggestion = ipaddress.ip_network((address, prefix), strict=False)
        raise AddressError(f"{text!r} has host bits set; did you mean {suggestion}?") from None
    mapped = network.version == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped
    if mapped:
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _config_address(host: str, text: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{text!r} is not an IP address or CIDR") from None
    if address.version == 4 and str(address) != host:
        raise AddressError(f"{text!r}: IPv4 octets must not have leading zeros")
    if address.version == 6 and address.scope_id is not None:
        raise AddressError(f"{text!r}: zone identifiers (%...) are not allowed")
    return address


# -- matching ----------------------------------------------------------------------------------------

class AddressSet:
    """A set of CIDRs compiled for fast membership tests. Build it once; it is immutable."""

    __slots__ = ("_ranges",)

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in networks:
            spans[network.version].append((int(network.network_address), int(network.broadcast_address)))
        self._ranges = {version: _merge(items) for version, items in spans.items()}

    def __contains__(self, address: IPAddress) -> bool:
        starts, ends = self._ranges[address.version]
        value = int(address)
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def __bool__(self) -> bool:
        return any(starts for starts, _ in self._ranges.values())

    def within(self, other: AddressSet) -> bool:
        """Whether every address of this set is in `other`."""
        for version, (starts, ends) in self._ranges.items():
            other_starts, other_ends = other._ranges[version]
            for start, end in zip(starts, ends):
                i = bisect_right(other_starts, start) - 1
                if i < 0 or end > other_ends[i]:
                    return False
        return True

    def __len__(self) -> int:
        """Number of disjoint ranges left after merging overlapping and adjacent CIDRs."""
        return sum(len(starts) for starts, _ in self._ranges.values())


def _merge(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(spans):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


NO_ADDRESSES = AddressSet()

#: Stands for a header value that could not be read (refused like a malformed one).
_UNREADABLE = object()


# -- decisions ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """The outcome for one request. `client_ip` and `peer_ip` are normalised address strings."""

    reason: Reason
    source: Source
    peer_ip: str | None
    client_ip: str | None = None
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.ALLOWED

    def message(self, configured: str | None) -> str:
        """The client-facing message: the configured one, or ip-restriction's default wording.

        The default names the client address when one was resolved, else the peer; a header value
        that was not accepted is never echoed.
        """
        if configured is not None:
            return configured
        address = self.client_ip or self.peer_ip
        return DEFAULT_MESSAGE.format(address=address) if address else NO_ADDRESS_MESSAGE

    def shared_mark(self) -> dict[str, object]:
        """What a passed request publishes in kong.ctx.shared for later plugins and the guard."""
        return {
            "client_ip": self.client_ip,
            "peer_ip": self.peer_ip,
            "source": self.source.value,
            # Always true: a request whose client address cannot be vouched for (it is the peer
            # itself, Kong's trusted_ips rewrite, or a header from a trusted proxy) is refused, not
            # passed. The key is part of the contract other plugins read.
            "trusted": True,
        }


@dataclass(frozen=True)
class Policy:
    """A compiled ip-allowlist config. Construct once per plugin instance; `decide` per request.

    Raises ConfigError (naming the config field) for combinations that cannot work.
    """

    source: Source
    allow: AddressSet = NO_ADDRESSES
    deny: AddressSet = NO_ADDRESSES
    trusted_proxies: AddressSet = NO_ADDRESSES
    header_name: str | None = None
    forwarded_for_hops: int = 1
    require_trusted_peer: bool = True

    def __post_init__(self) -> None:
        if self.source is Source.HEADER:
            if not self.header_name:
                raise ConfigError("header_name", "required when source is header")
            if not self.trusted_proxies:
                raise ConfigError("trusted_proxies",
                                  "required when source is header (set trusted_proxies or "
                                  "trusted_proxies_presets)")
            if self.forwarded_for_hops < 1:
                raise ConfigError("forwarded_for_hops", "must be at least 1")
            if self.forwarded_for_hops != 1 and not self.header_is_list:
                raise ConfigError("forwarded_for_hops", f"only applies to {X_FORWARDED_FOR}; "
                                                        f"{self.header_name} carries one address")
            return
        if not (self.allow or self.deny):
            raise ConfigError("allow", f"set at least one of allow, allow_presets, deny, deny_presets "
                                       f"(source {self.source.value} checks nothing otherwise)")
        for name, unused in (("header_name", self.header_name is not None),
                             ("trusted_proxies", bool(self.trusted_proxies)),
                             ("forwarded_for_hops", self.forwarded_for_hops != 1),
                             ("require_trusted_peer", not self.require_trusted_peer)):
            if unused:
                raise ConfigError(name, "only used when source is header")

    @property
    def header_is_list(self) -> bool:
        return (self.header_name or "").lower() == X_FORWARDED_FOR.lower()

    def decide(self, peer: object, *, forwarded: object = None, header: object = None) -> Decision:
        """Resolve the client address and check it.

        `peer` is nginx's `$realip_remote_addr`; `forwarded` is `kong.client.get_forwarded_ip()`
        (source forwarded); `header` is the header's value as Kong gives it, None when absent
        (source header). Values may be of any type: whatever is not a clean address is refused.
        """
        peer_ip = _parse_ip(peer) if isinstance(peer, str) else None
        if self.source is Source.PEER:
            if peer_ip is None:
                return self._refuse(Reason.NO_ADDRESS, None, None, f"peer={_shown(peer)}")
            return self._check(peer_ip, peer_ip[1])
        if self.source is Source.FORWARDED:
            peer_text = peer_ip[1] if peer_ip is not None else None
            client_ip = _parse_ip(forwarded) if isinstance(forwarded, str) else None
            if client_ip is None:
                return self._refuse(Reason.NO_ADDRESS, peer_text, None, f"forwarded={_shown(forwarded)}")
            return self._check(client_ip, peer_text)
        return self._decide_header(peer, peer_ip, header)

    def decide_headers(self, peer: object, headers: object) -> Decision:
        """`decide` for source header, from Kong's whole header map (`kong.request.get_headers`).

        Every line of the header counts, joined with ", " as nginx 1.23+ joins them. Kong 3.9's
        `get_header` does the same, but older Kongs (nginx < 1.23) give only the FIRST line: behind
        a proxy that adds its own line rather than appending to the client's, the client would
        pick its own address. A map that is not a map, or may have been cut at MAX_HEADER_LINES,
        is refused."""
        return self.decide_whole(peer, whole_header_map(headers))

    def decide_whole(self, peer: object, whole: Mapping[str, Any] | None) -> Decision:
        """`decide_headers` for a map `whole_header_map` already checked (None: not whole)."""
        if whole is None:
            return self.decide(peer, header=_UNREADABLE)
        value = whole.get((self.header_name or "").lower())
        if isinstance(value, list):
            value = ", ".join(value) if value and all(isinstance(v, str) for v in value) else _UNREADABLE
        return self.decide(peer, header=value)

    def _decide_header(self, peer: object, peer_ip: _Parsed | None, header: object) -> Decision:
        if peer_ip is None:
            return self._refuse(Reason.NO_ADDRESS, None, None, f"peer={_shown(peer)}")
        peer_text = peer_ip[1]
        if peer_ip[0] not in self.trusted_proxies:
            if header is not None:
                return self._refuse(Reason.UNTRUSTED_PEER_HEADER, peer_text, None,
                                    f"{self.header_name} sent by a peer outside trusted_proxies")
            if self.require_trusted_peer:
                return self._refuse(Reason.PEER_NOT_TRUSTED, peer_text, None, "peer outside trusted_proxies")
            return self._check(peer_ip, peer_text)
        if header is None:
            return self._refuse(Reason.HEADER_MISSING, peer_text, None,
                                f"trusted proxy sent no {self.header_name}")
        if header is _UNREADABLE:
            return self._refuse(Reason.HEADER_MALFORMED, peer_text, None,
                                f"header lines could not all be read ({MAX_HEADER_LINES} at most)")
        if not isinstance(header, str):
            return self._refuse(Reason.HEADER_MALFORMED, peer_text, None,
                                f"{self.header_name} is a {type(header).__name__}")
        if self.header_is_list:
            return self._decide_hops(peer_text, header)
        client_ip = _parse_forwarded(header) if "," not in header else None
        if client_ip is None:
            return self._refuse(Reason.HEADER_MALFORMED, peer_text, None,
                                f"{self.header_name}={_shown(header)}")
        return self._check(client_ip, peer_text)

    def _decide_hops(self, peer_text: str, header: str) -> Decision:
        """X-Forwarded-For: the client is the `forwarded_for_hops`-th element from the right.

        Each trusted proxy appends the address it received the request from, so the elements to the
        right of the client's are proxies (each must be in trusted_proxies); elements to its left are
        whatever the client wrote and are ignored, even when malformed.
        """
        hops = self.forwarded_for_hops
        parts = header.rsplit(",", hops)
        if len(parts) < hops:
            return self._refuse(Reason.HEADER_TOO_FEW_HOPS, peer_text, None,
                                f"{self.header_name} has {len(parts)} of {hops} hops: {_shown(header)}")
        used = [_parse_forwarded(part) for part in parts[-hops:]]
        if any(parsed is None for parsed in used):
            return self._refuse(Reason.HEADER_MALFORMED, peer_text, None,
                                f"{self.header_name}={_shown(header)}")
        client_ip, *proxies = used
        for proxy, proxy_text in proxies:
            if proxy not in self.trusted_proxies:
                return self._refuse(Reason.UNTRUSTED_HOP, peer_text, None,
                                    f"hop {proxy_text} in {self.header_name} is outside trusted_proxies")
        return self._check(client_ip, peer_text)

    def _check(self, client_ip: _Parsed, peer_text: str | None) -> Decision:
        address, client_text = client_ip
        if address in self.deny:
            return self._refuse(Reason.ADDRESS_DENIED, peer_text, client_text, "client address in deny")
        if self.allow and address not in self.allow:
            return self._refuse(Reason.ADDRESS_NOT_ALLOWED, peer_text, client_text,
                                "client address not in allow")
        return Decision(Reason.ALLOWED, self.source, peer_text, client_text)

    def _refuse(self, reason: Reason, peer_text: str | None, client_text: str | None, why: str) -> Decision:
        parts = [f"source={self.source.value}"]
        if peer_text:
            parts.append(f"peer={peer_text}")
        if client_text:
            parts.append(f"client={client_text}")
        parts.append(why)
        return Decision(reason, self.source, peer_text, client_text, " ".join(parts))


def _shown(value: object) -> str:
    """A request value for the log: repr'd (no raw control characters) and cut short."""
    if isinstance(value, str) and len(value) > _DETAIL_VALUE_CHARS:
        return repr(value[:_DETAIL_VALUE_CHARS]) + "..."
    return repr(value)
