"""Every spelling of an owned header is removed in the same set_headers call."""

from __future__ import annotations

from kong_mtls.core.headers import other_spellings, with_every_spelling


def test_other_spellings_of_a_name_cover_every_dash_and_underscore_choice() -> None:
    assert set(other_spellings("X-Consumer-ID")) == {"X_Consumer-ID", "X-Consumer_ID", "X_Consumer_ID"}
    assert len(other_spellings("X-Consumer-Custom-ID")) == 7
    assert set(other_spellings("X_Real-IP")) == {"X-Real-IP", "X_Real_IP", "X-Real_IP"}
    assert other_spellings("apikey") == ()


def test_with_every_spelling_removes_the_others_and_keeps_the_values() -> None:
    changes = with_every_spelling({"X-Consumer-ID": "c1", "X-Anonymous-Consumer": []})
    assert changes["X-Consumer-ID"] == "c1" and changes["X_Consumer_ID"] == []
    assert changes["X_Anonymous-Consumer"] == [] and len(changes) == 8
    # a spelling that is itself set keeps its value, whatever the order
    assert with_every_spelling({"A_B": "kept", "A-B": "also"}) == {"A_B": "kept", "A-B": "also"}


def test_a_name_set_in_one_case_is_not_also_removed_in_another():
    """Kong applies the set_headers table in no set order: one name, one entry (second review)."""
    changes = with_every_spelling({"x_client_cert_dn": [], "X-Client-Cert-DN": "CN=alice"})
    by_name: dict[str, list] = {}
    for name, value in changes.items():
        by_name.setdefault(name.lower(), []).append(value)
    assert by_name["x-client-cert-dn"] == ["CN=alice"]
    assert by_name["x_client_cert_dn"] == [[]]
