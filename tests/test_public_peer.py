"""Connections that refuse non-public peers on the connected socket (DNS rebinding guard)."""

from __future__ import annotations

import pytest
import requests

from backend.public_peer import is_public_address, non_public_peer, public_peer_session
from tests.support.http_server import LoopbackHTTPServer, Response


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2001:4860:4860::8888", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("fe80::1%eth0", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_public_peer_session_refuses_a_loopback_peer_before_sending_the_request():
    with LoopbackHTTPServer() as server:
        server.routes["/x"] = Response(body=b"secret")
        with pytest.raises(requests.ConnectionError) as caught:
            public_peer_session().get(server.url("/x"), timeout=5)
        assert non_public_peer(caught.value) == "127.0.0.1"
        assert server.requests == []
        assert requests.Session().get(server.url("/x"), timeout=5).content == b"secret"  # reachable


def test_non_public_peer_is_none_for_other_errors():
    assert non_public_peer(requests.ConnectionError("refused")) is None
    assert non_public_peer(ValueError("x")) is None
