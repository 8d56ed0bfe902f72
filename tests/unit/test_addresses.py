"""kong_mtls.core.addresses: parsing, CIDR matching and client-address resolution."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kong_mtls.core.addresses import (
    DEFAULT_MESSAGE,
    NO_ADDRESS_MESSAGE,
    AddressError,
    AddressSet,
    Policy,
    Reason,
    Source,
    parse_forwarded_address,
    parse_ip,
    parse_network,
)
from kong_mtls.presets import load_cidr_preset
from kong_mtls.schema import ConfigError

CLOUDFLARE = AddressSet(parse_network(c) for c in load_cidr_preset("cloudflare"))
CF_PEER = "173.245.48.10"
CF_PEER_V6 = "2606:4700::6810:85e5"
STRANGER = "198.51.100.23"
VISITOR = "203.0.113.77"


def cidrs(*texts: str) -> AddressSet:
    return AddressSet(parse_network(t) for t in texts)


# -- parse_ip ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1"),
    ("0.0.0.0", "0.0.0.0"),
    ("255.255.255.255", "255.255.255.255"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("::1", "::1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),        # IPv4-mapped IPv6 becomes IPv4
    ("::ffff:c000:201", "192.0.2.1"),
])
def test_parse_ip_accepts_and_normalises(text, expected):
    assert str(parse_ip(text)) == expected


@pytest.mark.parametrize("text", [
    "", " 192.0.2.1", "192.0.2.1 ", "192.0.2.1:80", "[2001:db8::1]", "fe80::1%eth0", "192.0.2",
    "192.0.2.256", "010.0.0.1", "192.0.2.01", "unknown", "unix:", "1.2.3.4/32", "\uff11.2.3.4",
    "::ffff:300.1.1.1", "2001:db8::1::1", "1" * 100, None, 3232235521, b"192.0.2.1", ["192.0.2.1"],
])
def test_parse_ip_refuses_anything_but_a_plain_literal(text):
    assert parse_ip(text) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1"),
    (" 192.0.2.1\t", "192.0.2.1"),
    ("192.0.2.1:8080", "192.0.2.1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"),
    ("[::ffff:192.0.2.1]:1", "192.0.2.1"),
])
def test_parse_forwarded_address_accepts_ports_and_brackets(text, expected):
    assert str(parse_forwarded_address(text)) == expected


@pytest.mark.parametrize("text", [
    "", "unknown", "[192.0.2.1]", "[2001:db8::1", "[2001:db8::1]x", "[2001:db8::1]:", "192.0.2.1:",
    "192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:80:90", "192.0.2.1:8o", "_hidden", "for=192.0.2.1",
    "[2001:db8::1]:99999", "192.0.2.1 , 192.0.2.2",
])
def test_parse_forwarded_address_refuses_junk(text):
    assert parse_forwarded_address(text) is None


# -- parse_network ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1/32"),
    ("192.0.2.0/24", "192.0.2.0/24"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("::/0", "::/0"),
    ("2001:db8::1", "2001:db8::1/128"),
    ("2001:DB8::/32", "2001:db8::/32"),
    ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
    ("::ffff:0:0/96", "0.0.0.0/0"),
    ("::ffff:192.0.2.1", "192.0.2.1/32"),
])
def test_parse_network_accepts(text, expected):
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize(("text", "problem"), [
    ("10.1.2.3/8", "host bits set; did you mean 10.0.0.0/8?"),
    ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
    ("192.0.2.0/33", "prefix length"),
    ("2001:db8::/129", "prefix length"),
    ("192.0.2.0/", "prefix length"),
    ("192.0.2.0/+24", "prefix length"),
    ("10.0.0.0/255.0.0.0", "prefix length"),
    ("010.0.0.0/8", "010.0.0.0/8"),
    ("fe80::1%eth0", "zone"),
    (" 10.0.0.0/8", "not an IP address"),
    ("example.com", "not an IP address"),
    ("", "not an IP address"),
    (None, "not an IP address"),
    (42, "not an IP address"),
])
def test_parse_network_refuses_with_a_clear_reason(text, problem):
    with pytest.raises(AddressError) as info:
        parse_network(text)
    assert problem in str(info.value)


# -- AddressSet ------------------------------------------------------------------------------------

def test_network_and_broadcast_addresses_are_inside_neighbours_outside():
    s = cidrs("192.0.2.0/24", "2001:db8::/126")
    for inside in ("192.0.2.0", "192.0.2.255", "2001:db8::", "2001:db8::3"):
        assert parse_ip(inside) in s
    for outside in ("192.0.1.255", "192.0.3.0", "2001:db8::4", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"):
        assert parse_ip(outside) not in s


def test_slash_zero_matches_its_whole_family_only():
    v4_all = cidrs("0.0.0.0/0")
    assert parse_ip("0.0.0.0") in v4_all and parse_ip("255.255.255.255") in v4_all
    assert parse_ip("::") not in v4_all and parse_ip("2001:db8::1") not in v4_all
    v6_all = cidrs("::/0")
    assert parse_ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") in v6_all
    assert parse_ip("192.0.2.1") not in v6_all
    # IPv4-mapped addresses are IPv4: ::/0 does not cover them, 0.0.0.0/0 does.
    assert parse_ip("::ffff:192.0.2.1") not in v6_all
    assert parse_ip("::ffff:192.0.2.1") in v4_all


def test_host_routes_match_exactly():
    s = cidrs("192.0.2.7/32", "2001:db8::7/128")
    assert parse_ip("192.0.2.7") in s and parse_ip("2001:db8::7") in s
    assert parse_ip("192.0.2.6") not in s and parse_ip("192.0.2.8") not in s
    assert parse_ip("2001:db8::6") not in s and parse_ip("2001:db8::8") not in s


def test_mapped_network_in_config_matches_plain_and_mapped_clients():
    s = cidrs("::ffff:10.0.0.0/104")
    assert parse_ip("10.200.0.1") in s
    assert parse_ip("::ffff:10.200.0.1") in s
    assert parse_ip("11.0.0.0") not in s


def test_overlapping_and_adjacent_ranges_merge():
    s = cidrs("10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24", "10.0.3.5")
    assert len(s) == 2                      # 10.0.0.0-10.0.1.255 and 10.0.3.0/24
    assert parse_ip("10.0.2.0") not in s
    assert parse_ip("10.0.1.255") in s
    assert not AddressSet() and AddressSet([parse_network("::1")])


networks_v4 = st.builds(lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
                        st.integers(0, 2**32 - 1), st.integers(0, 32))
networks_v6 = st.builds(lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
                        st.integers(0, 2**128 - 1), st.integers(0, 128))


@given(st.lists(st.one_of(networks_v4, networks_v6), max_size=25),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                          st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)), min_size=1, max_size=10))
def test_address_set_agrees_with_brute_force(networks, addresses):
    compiled = AddressSet(networks)
    for address in addresses:
        expected = any(address.version == n.version and address in n for n in networks)
        assert (address in compiled) is expected


@given(st.lists(networks_v4, min_size=1, max_size=20))
def test_every_network_edge_is_inside(networks):
    compiled = AddressSet(networks)
    for n in networks:
        assert n.network_address in compiled and n.broadcast_address in compiled


# -- Policy: peer and forwarded ----------------------------------------------------------------------

def test_deny_wins_over_allow():
    policy = Policy(Source.PEER, allow=cidrs("10.0.0.0/8"), deny=cidrs("10.6.0.0/16"))
    assert policy.decide("10.1.2.3").allowed
    denied = policy.decide("10.6.7.8")
    assert denied.reason is Reason.ADDRESS_DENIED and denied.client_ip == "10.6.7.8"
    assert policy.decide("192.0.2.1").reason is Reason.ADDRESS_NOT_ALLOWED


def test_deny_only_lets_everything_else_through():
    policy = Policy(Source.PEER, deny=cidrs("192.0.2.0/24", "2001:db8::/32"))
    assert policy.decide("192.0.3.1").allowed and policy.decide("2001:db9::1").allowed
    assert policy.decide("2001:db8::1").reason is Reason.ADDRESS_DENIED


def test_mapped_peer_is_checked_as_ipv4():
    decision = Policy(Source.PEER, allow=cidrs("10.0.0.0/8")).decide("::ffff:10.1.2.3")
    assert decision.allowed and decision.client_ip == "10.1.2.3" and decision.peer_ip == "10.1.2.3"


@pytest.mark.parametrize("peer", [None, "", "unix:", "unix:/run/kong.sock", 17, "10.0.0.1, 10.0.0.2"])
def test_peer_without_an_ip_is_refused(peer):
    policy = Policy(Source.PEER, allow=cidrs("0.0.0.0/0", "::/0"))
    decision = policy.decide(peer)
    assert decision.reason is Reason.NO_ADDRESS and not decision.allowed
    assert decision.message(None) == NO_ADDRESS_MESSAGE


def test_forwarded_source_checks_kongs_resolved_address_not_the_peer():
    policy = Policy(Source.FORWARDED, allow=cidrs("203.0.113.0/24"))
    decision = policy.decide(STRANGER, forwarded=VISITOR)
    assert decision.allowed and decision.client_ip == VISITOR and decision.peer_ip == STRANGER
    assert decision.shared_mark() == {"client_ip": VISITOR, "peer_ip": STRANGER, "source": "forwarded",
                                      "trusted": True}
    assert policy.decide(VISITOR, forwarded=STRANGER).reason is Reason.ADDRESS_NOT_ALLOWED
    assert policy.decide(VISITOR, forwarded=None).reason is Reason.NO_ADDRESS
    unix_peer = policy.decide("unix:", forwarded=VISITOR)
    assert unix_peer.allowed and unix_peer.peer_ip is None


# -- Policy: header ------------------------------------------------------------------------------------

def cf_policy(**kwargs) -> Policy:
    kwargs.setdefault("header_name", "CF-Connecting-IP")
    kwargs.setdefault("trusted_proxies", CLOUDFLARE)
    return Policy(Source.HEADER, **kwargs)


@pytest.mark.parametrize("peer", [CF_PEER, CF_PEER_V6, "::ffff:173.245.48.10"])
def test_header_from_cloudflare_peer_is_the_client_address(peer):
    decision = cf_policy().decide(peer, header=VISITOR)
    assert decision.allowed
    assert decision.client_ip == VISITOR
    assert decision.shared_mark() == {"client_ip": VISITOR, "peer_ip": str(parse_ip(peer)),
                                      "source": "header", "trusted": True}


@pytest.mark.parametrize("value", [VISITOR, CF_PEER, "", "garbage", "127.0.0.1"])
def test_header_from_untrusted_peer_is_refused_whatever_it_says(value):
    decision = cf_policy(require_trusted_peer=False).decide(STRANGER, header=value)
    assert decision.reason is Reason.UNTRUSTED_PEER_HEADER
    assert decision.client_ip is None
    assert decision.message(None) == DEFAULT_MESSAGE.format(address=STRANGER)


def test_untrusted_peer_without_header_is_refused_unless_direct_peers_are_accepted():
    assert cf_policy().decide(STRANGER).reason is Reason.PEER_NOT_TRUSTED
    lenient = cf_policy(require_trusted_peer=False, allow=cidrs("198.51.100.0/24"))
    direct = lenient.decide(STRANGER)
    assert direct.allowed and direct.client_ip == STRANGER and direct.peer_ip == STRANGER
    assert lenient.decide("192.0.2.9").reason is Reason.ADDRESS_NOT_ALLOWED


def test_trusted_peer_without_header_is_refused():
    assert cf_policy().decide(CF_PEER).reason is Reason.HEADER_MISSING


@pytest.mark.parametrize("value", [
    "", " ", "unknown", "203.0.113.77, 203.0.113.78", "203.0.113.77,", "203.0.113.256", "0203.0.113.7",
    "203.0.113.77\r\nX-Injected: 1", "\udcff203.0.113.77", "x" * 10_000, ["203.0.113.77"], 42,
])
def test_malformed_header_is_refused_and_never_echoed(value):
    decision = cf_policy().decide(CF_PEER, header=value)
    assert decision.reason is Reason.HEADER_MALFORMED
    assert decision.client_ip is None
    assert decision.message(None) == DEFAULT_MESSAGE.format(address=CF_PEER)
    assert len(decision.detail) < 200 and "\n" not in decision.detail


def test_allow_and_deny_apply_to_the_header_address():
    policy = cf_policy(allow=cidrs("203.0.113.0/24"), deny=cidrs("203.0.113.66"))
    assert policy.decide(CF_PEER, header=VISITOR).allowed
    denied = policy.decide(CF_PEER, header="203.0.113.66")
    assert denied.reason is Reason.ADDRESS_DENIED
    assert denied.message(None) == "IP address not allowed: 203.0.113.66"
    # The peer itself is not checked against allow: Cloudflare is not in 203.0.113.0/24.
    assert policy.decide(CF_PEER, header="192.0.2.1").reason is Reason.ADDRESS_NOT_ALLOWED


def test_configured_message_replaces_the_default():
    decision = cf_policy().decide(STRANGER, header=VISITOR)
    assert decision.message("Go through Cloudflare") == "Go through Cloudflare"


# -- Policy: X-Forwarded-For hop counting -----------------------------------------------------------

LB = "10.0.0.5"
EDGE = "10.0.1.9"


def xff_policy(hops: int = 1, **kwargs) -> Policy:
    return Policy(Source.HEADER, header_name="X-Forwarded-For", trusted_proxies=cidrs("10.0.0.0/16"),
                  forwarded_for_hops=hops, **kwargs)


def test_one_hop_takes_the_rightmost_element_and_ignores_what_the_client_wrote():
    policy = xff_policy()
    assert policy.decide(LB, header=VISITOR).client_ip == VISITOR
    spoofed = policy.decide(LB, header=f"1.1.1.1, not-an-ip, {VISITOR}")
    assert spoofed.allowed and spoofed.client_ip == VISITOR
    assert policy.decide(LB, header=f"{VISITOR}:5123").client_ip == VISITOR


def test_two_hops_require_the_intermediate_proxy_to_be_trusted():
    policy = xff_policy(hops=2)
    ok = policy.decide(LB, header=f"6.6.6.6, {VISITOR}, {EDGE}")
    assert ok.allowed and ok.client_ip == VISITOR
    forged = policy.decide(LB, header=f"{VISITOR}, 6.6.6.6")
    assert forged.reason is Reason.UNTRUSTED_HOP and forged.client_ip is None
    assert policy.decide(LB, header=VISITOR).reason is Reason.HEADER_TOO_FEW_HOPS
    assert policy.decide(LB, header=f"{VISITOR}, garbage").reason is Reason.HEADER_MALFORMED
    assert policy.decide(LB, header=f"garbage, {EDGE}").reason is Reason.HEADER_MALFORMED
    assert policy.decide(LB, header=f"{VISITOR}, {EDGE},").reason is Reason.HEADER_MALFORMED


def test_xff_ipv6_elements_in_brackets_with_ports():
    policy = Policy(Source.HEADER, header_name="x-forwarded-for", forwarded_for_hops=2,
                    trusted_proxies=cidrs("2001:db8:ffff::/48"))
    decision = policy.decide("2001:db8:ffff::1", header="[2001:db8::77]:4431, [2001:db8:ffff::2]")
    assert decision.allowed and decision.client_ip == "2001:db8::77"


def test_xff_from_untrusted_peer_is_refused():
    assert xff_policy().decide("192.0.2.1", header=VISITOR).reason is Reason.UNTRUSTED_PEER_HEADER


@given(st.text(max_size=200))
def test_arbitrary_header_text_never_raises_and_only_clean_values_pass(value):
    decision = xff_policy(hops=2).decide(LB, header=value)
    if decision.allowed:
        parts = value.rsplit(",", 2)
        assert decision.client_ip == str(parse_forwarded_address(parts[-2]))
        assert str(parse_forwarded_address(parts[-1])).startswith("10.0.")
    decision = cf_policy().decide(CF_PEER, header=value)
    assert decision.allowed == (parse_forwarded_address(value) is not None and "," not in value)


# -- Policy: construction ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"source": Source.PEER}, "allow"),
    ({"source": Source.FORWARDED}, "allow"),
    ({"source": Source.HEADER, "trusted_proxies": CLOUDFLARE}, "header_name"),
    ({"source": Source.HEADER, "header_name": "CF-Connecting-IP"}, "trusted_proxies"),
    ({"source": Source.HEADER, "header_name": "CF-Connecting-IP", "trusted_proxies": CLOUDFLARE,
      "forwarded_for_hops": 2}, "forwarded_for_hops"),
    ({"source": Source.HEADER, "header_name": "X-Forwarded-For", "trusted_proxies": CLOUDFLARE,
      "forwarded_for_hops": 0}, "forwarded_for_hops"),
    ({"source": Source.PEER, "allow": CLOUDFLARE, "header_name": "X-Forwarded-For"}, "header_name"),
    ({"source": Source.PEER, "allow": CLOUDFLARE, "trusted_proxies": CLOUDFLARE}, "trusted_proxies"),
    ({"source": Source.FORWARDED, "deny": CLOUDFLARE, "forwarded_for_hops": 2}, "forwarded_for_hops"),
    ({"source": Source.PEER, "allow": CLOUDFLARE, "require_trusted_peer": False}, "require_trusted_peer"),
])
def test_unusable_policies_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Policy(**kwargs)
    assert info.value.field == field


def test_header_source_may_have_empty_allow_and_deny():
    assert cf_policy().decide(CF_PEER, header="192.0.2.200").allowed
