"""Named lists shipped with the package, and the loader plugins use to read them.

A CIDR preset is a JSON document (`cloudflare-ips.json` is the model):

    {"name": "cloudflare", "taken": "2026-11-24", "source": "<where it came from>",
     "ipv4_cidrs": ["173.245.48.0/20", ...], "ipv6_cidrs": ["2400:cb00::/32", ...]}

`kong-mtls cloudflare-ranges` writes files in the same format, so an operator can point a plugin at
a fresher copy than the one shipped (`load_cidr_preset(name, override_file=...)`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from kong_mtls.core.addresses import AddressError, IPNetwork, parse_network
from kong_mtls.files import FileReadError, read_limited

PRESET_DIR = Path(__file__).resolve().parent

#: CIDR preset name -> file shipped in this package.
CIDR_PRESET_FILES: dict[str, str] = {"cloudflare": "cloudflare-ips.json"}
CIDR_PRESET_NAMES: tuple[str, ...] = tuple(CIDR_PRESET_FILES)



class PresetError(ValueError):
    """A preset that is unknown, unreadable or malformed; the message says which and why."""


@dataclass(frozen=True)
class CidrList:
    name: str
    taken: str
    source: str
    ipv4_cidrs: tuple[str, ...]
    ipv6_cidrs: tuple[str, ...]

    @property
    def cidrs(self) -> tuple[str, ...]:
        return self.ipv4_cidrs + self.ipv6_cidrs

    def to_json(self) -> str:
        document = {"name": self.name, "taken": self.taken, "source": self.source,
                    "ipv4_cidrs": list(self.ipv4_cidrs), "ipv6_cidrs": list(self.ipv6_cidrs)}
        return json.dumps(document, indent=2) + "\n"


#: A preset range wider than this, or a list covering more than one such range in all, is refused
#: as implausible, in a shipped preset, a `preset_files`
#: override and a list fetched by `kong-mtls cloudflare-ranges` alike: a tampered or broken list
#: could otherwise open an allowlist to a large part of the Internet (`0.0.0.0/0`). Cloudflare's
#: widest are /13 (IPv4) and /29 (IPv6).
WIDEST_PREFIX = {4: 8, 6: 16}


def width_problem(networks: Sequence[IPNetwork], ranges: int = 1) -> str | None:
    """Why CIDRs are implausibly wide for a list of proxies (their headers are believed), or None:
    one range wider than WIDEST_PREFIX, or all of a family together covering more than `ranges`
    such ranges (a preset: one; an operator's trusted proxies: a few, e.g. the private ranges and
    Cloudflare's)."""
    for version, widest in WIDEST_PREFIX.items():
        family = [n for n in networks if n.version == version]
        for network in family:
            if network.prefixlen < widest:
                return f"{network} is wider than /{widest}"
        covered = sum(n.num_addresses for n in ipaddress.collapse_addresses(family))
        if covered > ranges * 2 ** ((32 if version == 4 else 128) - widest):
            count = "one" if ranges == 1 else str(ranges)
            return f"the IPv{version} ranges together cover more addresses than {count} /{widest}"
    return None


def parse_cidr_list(document: object, origin: str) -> CidrList:
    """Check a preset document: every CIDR valid and of the family its list names, at least one."""
    if not isinstance(document, Mapping):
        raise PresetError(f"{origin}: expected a JSON object")
    name = document.get("name")
    if not isinstance(name, str) or not name:
        raise PresetError(f"{origin}: 'name' must be a non-empty string")
    families = {}
    for key, version in (("ipv4_cidrs", 4), ("ipv6_cidrs", 6)):
        items = document.get(key, [])
        if not isinstance(items, list):
            raise PresetError(f"{origin}: {key!r} must be a list of CIDR strings")
        networks = []
        for i, item in enumerate(items, start=1):
            try:
                network = parse_network(item)
            except AddressError as exc:
                raise PresetError(f"{origin}: {key}[{i}]: {exc}") from None
            if network.version != version:
                raise PresetError(f"{origin}: {key}[{i}]: {item!r} is not an IPv{version} CIDR")
            problem = width_problem([network])
            if problem:
                raise PresetError(f"{origin}: {key}[{i}]: {problem}; refusing an implausible range")
            networks.append(network)
        problem = width_problem(networks)
        if problem:
            raise PresetError(f"{origin}: {key}: {problem}; refusing an implausible list")
        families[key] = tuple(items)
    if not families["ipv4_cidrs"] and not families["ipv6_cidrs"]:
        raise PresetError(f"{origin}: no CIDRs")
    return CidrList(name=name, taken=str(document.get("taken") or ""),
                    source=str(document.get("source") or ""), **families)


def read_cidr_list(path: str | Path) -> CidrList:
    """A preset-format file (a shipped preset or one written by `kong-mtls cloudflare-ranges`)."""
    try:
        data = read_limited(path)
    except FileReadError as exc:
        raise PresetError(f"{path}: {exc}") from None
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise PresetError(f"{path}: not valid JSON: {exc}") from None
    return parse_cidr_list(document, str(path))


def cidr_list(name: str, override_file: str | Path | None = None) -> CidrList:
    """The named CIDR preset: from `override_file` when given (its `name` must match), else shipped."""
    if name not in CIDR_PRESET_FILES:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(CIDR_PRESET_NAMES)}")
    if override_file is None:
        return read_cidr_list(PRESET_DIR / CIDR_PRESET_FILES[name])
    loaded = read_cidr_list(override_file)
    if loaded.name != name:
        raise PresetError(f"{override_file}: holds preset {loaded.name!r}, not {name!r}")
    return loaded


def load_cidr_preset(name: str, override_file: str | Path | None = None) -> tuple[str, ...]:
    """The CIDRs (IPv4 then IPv6) of a named preset; raises PresetError."""
    return cidr_list(name, override_file).cidrs


# -- CA presets (client-cert-auth trust anchors) ---------------------------------------------------

#: CA preset name -> PEM file shipped in this package.
CA_PRESET_FILES: dict[str, str] = {"cloudflare-origin-pull": "cloudflare-origin-pull.pem"}
CA_PRESET_NAMES: tuple[str, ...] = tuple(CA_PRESET_FILES)


def load_ca_preset(name: str) -> list[x509.Certificate]:
    """The CA certificates of a named preset (shipped PEM); raises PresetError."""
    if name not in CA_PRESET_FILES:
        raise PresetError(f"unknown CA preset {name!r}; known: {', '.join(CA_PRESET_NAMES)}")
    path = PRESET_DIR / CA_PRESET_FILES[name]
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PresetError(f"{path}: unreadable CA preset: {exc}") from None
