"""ip-allowlist config: what Plugin(config) accepts, refuses (naming the field) and compiles; presets."""

from __future__ import annotations

import json

import pytest

from kong_mtls.constants import IP_ALLOWLIST, PRIORITIES
from kong_mtls.core.addresses import Source, parse_ip
from kong_mtls.kong.ip_allowlist import Plugin, Schema
from kong_mtls.kong.server import plugin_info
from kong_mtls.presets import (
    CIDR_PRESET_NAMES,
    PresetError,
    cidr_list,
    load_cidr_preset,
    parse_cidr_list,
    read_cidr_list,
)
from kong_mtls.schema import ConfigError

CF_LOCK = {"source": "header", "header_name": "CF-Connecting-IP", "trusted_proxies_presets": ["cloudflare"]}


def field_of(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Plugin(config)
    return info.value.field


# -- refused configs -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "field"), [
    ({}, "allow"),
    ({"allow": [], "deny": {}}, "allow"),                                  # Kong's empty-array encoding
    ({"allow": ["10.0.0.0/8", "10.1.2.3/8"]}, "allow[2]"),
    ({"deny": ["not-an-ip"]}, "deny[1]"),
    ({"allow": ["10.0.0.0/8", None]}, "allow[2]"),
    ({"allow_presets": ["cloudflare", "akamai"]}, "allow_presets[2]"),
    ({"deny_presets": ["fastly"]}, "deny_presets[1]"),
    ({"allow": ["10.0.0.0/8"], "source": "client"}, "source"),
    ({"allow": ["10.0.0.0/8"], "status": 200}, "status"),
    ({"allow": ["10.0.0.0/8"], "status": "403"}, "status"),
    ({"allow": ["10.0.0.0/8"], "message": ""}, "message"),
    ({"source": "header", "trusted_proxies_presets": ["cloudflare"]}, "header_name"),
    ({"source": "header", "header_name": "CF-Connecting-IP"}, "trusted_proxies"),
    ({**CF_LOCK, "trusted_proxies_presets": ["cloudfare"]}, "trusted_proxies_presets[1]"),
    ({**CF_LOCK, "trusted_proxies": ["173.245.48.0/33"]}, "trusted_proxies[1]"),
    ({**CF_LOCK, "header_name": "CF Connecting IP"}, "header_name"),
    ({**CF_LOCK, "header_name": "Forwarded"}, "header_name"),
    ({**CF_LOCK, "forwarded_for_hops": 2}, "forwarded_for_hops"),
    ({**CF_LOCK, "header_name": "X-Forwarded-For", "forwarded_for_hops": 0}, "forwarded_for_hops"),
    ({**CF_LOCK, "header_name": "X-Forwarded-For", "forwarded_for_hops": 33}, "forwarded_for_hops"),
    ({**CF_LOCK, "client_ip_header": "X-Real-Client-IP\r\nX-Evil"}, "client_ip_header"),
    ({"allow": ["10.0.0.0/8"], "trusted_proxies_presets": ["cloudflare"]}, "trusted_proxies"),
    ({"allow": ["10.0.0.0/8"], "header_name": "CF-Connecting-IP"}, "header_name"),
    ({**CF_LOCK, "preset_files": {"akamai": "/tmp/x.json"}}, "preset_files.akamai"),
    ({**CF_LOCK, "preset_files": {"cloudflare": "/nonexistent/cloudflare.json"}}, "preset_files.cloudflare"),
])
def test_bad_config_is_refused_naming_the_field(config, field):
    assert field_of(config) == field


def test_error_message_is_specific():
    expected = r"allow\[1\]: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8"
    with pytest.raises(ConfigError, match=expected):
        Plugin({"allow": ["10.1.2.3/8"]})


# -- accepted configs --------------------------------------------------------------------------------

def test_defaults_and_kong_extra_keys():
    plugin = Plugin({"allow": ["192.0.2.0/24"], "deny": None, "route_id": "r", "__seq__": 3,
                     "__plugin_id": "p", "message": None, "client_ip_header": None})
    assert plugin.policy.source is Source.PEER
    assert plugin.status == 403 and plugin.message is None and plugin.client_ip_header is None
    assert plugin.policy.decide("192.0.2.9").allowed
    assert not plugin.policy.decide("192.0.3.9").allowed


def test_cloudflare_lock_config_compiles_the_shipped_ranges():
    plugin = Plugin({**CF_LOCK, "client_ip_header": "X-Real-Client-IP", "status": 404, "message": "Not here"})
    assert plugin.status == 404 and plugin.message == "Not here"
    for cidr in load_cidr_preset("cloudflare"):
        first = cidr.split("/")[0]
        assert parse_ip(first) in plugin.policy.trusted_proxies
    assert parse_ip("198.51.100.1") not in plugin.policy.trusted_proxies
    assert not plugin.policy.allow and not plugin.policy.deny


def test_presets_and_explicit_entries_combine():
    plugin = Plugin({"allow": ["192.0.2.1"], "allow_presets": ["cloudflare"], "deny": ["104.16.0.1"]})
    policy = plugin.policy
    assert policy.decide("192.0.2.1").allowed
    assert policy.decide("104.16.0.2").allowed
    assert not policy.decide("104.16.0.1").allowed          # deny wins over the preset
    assert not policy.decide("192.0.2.2").allowed


def test_preset_file_overrides_the_shipped_list(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps({"name": "cloudflare", "taken": "2027-01-01", "source": "test",
                                "ipv4_cidrs": ["192.0.2.0/24"], "ipv6_cidrs": []}))
    plugin = Plugin({**CF_LOCK, "preset_files": {"cloudflare": str(path)}})
    assert plugin.policy.decide("192.0.2.5", header="203.0.113.1").allowed
    assert not plugin.policy.decide("173.245.48.1", header="203.0.113.1").allowed


def test_broken_preset_file_is_refused_at_start(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps({"name": "cloudflare", "ipv4_cidrs": ["192.0.2.0/24", "1.2.3.4/40"]}))
    with pytest.raises(ConfigError, match=r"preset_files.cloudflare: .*ipv4_cidrs\[2\]"):
        Plugin({**CF_LOCK, "preset_files": {"cloudflare": str(path)}})


@pytest.mark.parametrize(("key", "cidr"), [("ipv4_cidrs", "0.0.0.0/0"), ("ipv4_cidrs", "10.0.0.0/7"),
                                           ("ipv6_cidrs", "::/0"), ("ipv6_cidrs", "2000::/3")])
def test_a_preset_file_with_an_implausibly_wide_range_is_refused(tmp_path, key, cidr):
    """The width check of `kong-mtls cloudflare-ranges` holds for every preset file: one line of
    `0.0.0.0/0` would make every peer a trusted Cloudflare proxy."""
    path = tmp_path / "cf.json"
    first = "192.0.2.0/24" if key == "ipv4_cidrs" else "2001:db8::/32"
    path.write_text(json.dumps({"name": "cloudflare", key: [first, cidr]}))
    with pytest.raises(ConfigError, match=rf"preset_files.cloudflare: .*{key}\[2\].*wider than"):
        Plugin({**CF_LOCK, "preset_files": {"cloudflare": str(path)}})


def test_x_forwarded_for_with_hops():
    plugin = Plugin({"source": "header", "header_name": "x-forwarded-for", "forwarded_for_hops": 2,
                     "trusted_proxies": ["10.0.0.0/8"], "require_trusted_peer": False,
                     "allow": ["0.0.0.0/0"]})
    assert plugin.policy.decide("10.0.0.1", header="203.0.113.5, 10.9.9.9").client_ip == "203.0.113.5"


def test_dump_reports_name_priority_and_schema():
    info = plugin_info(IP_ALLOWLIST, Plugin, Schema)
    assert info["Name"] == IP_ALLOWLIST and info["Priority"] == PRIORITIES[IP_ALLOWLIST]
    assert info["Phases"] == ["access"]
    fields = info["Schema"]["fields"][0]["config"]["fields"]
    names = [next(iter(f)) for f in fields]
    assert names[:5] == ["allow", "deny", "allow_presets", "deny_presets", "source"]
    source = next(f["source"] for f in fields if "source" in f)
    assert source["default"] == "peer" and source["one_of"] == ["peer", "forwarded", "header"]


# -- presets -------------------------------------------------------------------------------------------

def test_shipped_cloudflare_preset():
    preset = cidr_list("cloudflare")
    assert "cloudflare" in CIDR_PRESET_NAMES
    assert len(preset.ipv4_cidrs) == 15 and len(preset.ipv6_cidrs) == 7
    assert "173.245.48.0/20" in preset.ipv4_cidrs and "2a06:98c0::/29" in preset.ipv6_cidrs
    assert preset.taken and preset.source.startswith("https://www.cloudflare.com/")
    assert load_cidr_preset("cloudflare") == preset.ipv4_cidrs + preset.ipv6_cidrs


def test_unknown_preset_and_mismatched_override(tmp_path):
    with pytest.raises(PresetError, match="unknown preset 'akamai'"):
        load_cidr_preset("akamai")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "elsewhere", "ipv4_cidrs": ["192.0.2.0/24"]}))
    with pytest.raises(PresetError, match="holds preset 'elsewhere'"):
        load_cidr_preset("cloudflare", other)


@pytest.mark.parametrize(("document", "problem"), [
    ([], "expected a JSON object"),
    ({"ipv4_cidrs": ["192.0.2.0/24"]}, "'name'"),
    ({"name": "x", "ipv4_cidrs": "192.0.2.0/24"}, "must be a list"),
    ({"name": "x", "ipv4_cidrs": ["2001:db8::/32"]}, "is not an IPv4 CIDR"),
    ({"name": "x", "ipv6_cidrs": ["192.0.2.0/24"]}, "is not an IPv6 CIDR"),
    ({"name": "x", "ipv4_cidrs": [], "ipv6_cidrs": []}, "no CIDRs"),
])
def test_malformed_preset_documents(document, problem):
    with pytest.raises(PresetError, match=problem):
        parse_cidr_list(document, "test.json")


def test_unreadable_preset_files(tmp_path):
    with pytest.raises(PresetError, match="cannot read"):
        read_cidr_list(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PresetError, match="not valid JSON"):
        read_cidr_list(bad)
