"""The client's address (serve.auth.client_ip) that rate limits, logs and audit events all use:
the peer, unless the peer is in TRUSTED_PROXIES; then the rightmost X-Forwarded-For address that
is not itself a trusted proxy (nginx's real_ip_recursive). A header from any other peer is
ignored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.requests import Request

from config.settings import SettingsError, get_settings, load_settings
from serve.auth import client_ip


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    def set_trusted(spec: str | None) -> None:
        if spec is None:
            monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
        else:
            monkeypatch.setenv("TRUSTED_PROXIES", spec)
        get_settings.cache_clear()

    yield set_trusted
    monkeypatch.delenv("TRUSTED_PROXIES", raising=False)
    get_settings.cache_clear()


def request(peer: str | None, *forwarded_for: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded_for]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers,
                    "client": (peer, 50000) if peer is not None else None})


def test_without_trusted_proxies_the_header_is_ignored(trust) -> None:  # type: ignore[no-untyped-def]
    trust(None)
    assert client_ip(request("10.0.0.5", "203.0.113.7")) == "10.0.0.5"
    assert client_ip(request("198.51.100.4")) == "198.51.100.4"
    assert client_ip(request(None, "203.0.113.7")) is None


def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(trust) -> None:  # type: ignore[no-untyped-def]
    trust("10.0.0.0/8")
    assert client_ip(request("198.51.100.4", "203.0.113.7")) == "198.51.100.4"
    assert client_ip(request("198.51.100.4", "10.0.0.9")) == "198.51.100.4"


def test_behind_a_trusted_proxy_the_forwarded_client_counts(trust) -> None:  # type: ignore[no-untyped-def]
    trust("10.0.0.0/8, 192.168.7.1")
    assert client_ip(request("10.0.0.5", "203.0.113.7")) == "203.0.113.7"
    assert client_ip(request("192.168.7.1", "203.0.113.8")) == "203.0.113.8"
    # Two clients behind the same proxy are two clients.
    assert client_ip(request("10.0.0.5", "203.0.113.9")) == "203.0.113.9"
    # No header: the proxy itself is the client (e.g. its health checks).
    assert client_ip(request("10.0.0.5")) == "10.0.0.5"


def test_the_rightmost_untrusted_hop_wins_over_what_the_client_wrote(trust) -> None:  # type: ignore[no-untyped-def]
    trust("10.0.0.0/8")
    # client -> 10.1.1.1 (trusted CDN hop) -> 10.0.0.5 (ingress, the peer); the client sent its own
    # X-Forwarded-For: "1.2.3.4", which the proxies kept on the left.
    assert client_ip(request("10.0.0.5", "1.2.3.4, 203.0.113.7, 10.1.1.1")) == "203.0.113.7"
    # The same chain split over several header lines, in order.
    assert client_ip(request("10.0.0.5", "1.2.3.4", "203.0.113.7, 10.1.1.1")) == "203.0.113.7"
    # Every hop trusted: the leftmost one.
    assert client_ip(request("10.0.0.5", "10.3.3.3, 10.1.1.1")) == "10.3.3.3"


def test_odd_entries_and_address_forms(trust) -> None:  # type: ignore[no-untyped-def]
    trust("10.0.0.0/8, 2001:db8:aaaa::/48")
    # Not an address: the walk stops at the last trusted hop, never returns the text.
    assert client_ip(request("10.0.0.5", "unknown")) == "10.0.0.5"
    assert client_ip(request("10.0.0.5", "203.0.113.7, nonsense, 10.1.1.1")) == "10.1.1.1"
    # Ports, brackets, empty entries, IPv6 (canonical form) and IPv4-mapped IPv6.
    assert client_ip(request("10.0.0.5", "203.0.113.7:4431")) == "203.0.113.7"
    assert client_ip(request("10.0.0.5", "[2001:DB8:0:0::1]:443")) == "2001:db8::1"
    assert client_ip(request("10.0.0.5", "203.0.113.7,, ")) == "203.0.113.7"
    assert client_ip(request("::ffff:10.0.0.5", "203.0.113.7")) == "203.0.113.7"
    assert client_ip(request("2001:db8:aaaa::5", "2001:db8:bbbb::7")) == "2001:db8:bbbb::7"
    # A peer that is no address at all (a test client's name) is passed through, bounded to
    # what the audit record holds.
    assert client_ip(request("testclient", "203.0.113.7")) == "testclient"
    assert client_ip(request("x" * 5000)) == "x" * 64


def test_trusted_proxies_must_be_addresses_or_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.2, ::1")
    assert [str(n) for n in load_settings().trusted_proxy_networks] == ["10.0.0.0/8", "127.0.0.2/32", "::1/128"]
    monkeypatch.setenv("TRUSTED_PROXIES", "")
    assert load_settings().trusted_proxy_networks == ()
    for bad in ("10.0.0.0/33", "ingress-nginx", "10.1.2.3/8"):
        monkeypatch.setenv("TRUSTED_PROXIES", f"127.0.0.1,{bad}")
        with pytest.raises(SettingsError, match=f"TRUSTED_PROXIES=.*{bad}"):
            load_settings()


def test_the_kubernetes_configmap_trusts_a_network_the_settings_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from tests.conftest import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "kuberay" / "base" / "configmap.yaml").read_text())
    monkeypatch.setenv("TRUSTED_PROXIES", config["data"]["TRUSTED_PROXIES"])
    assert load_settings().trusted_proxy_networks  # a deployment behind the Ingress trusts it
