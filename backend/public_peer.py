"""HTTP connections that refuse a non-public peer, checked on the connected socket.

The host policy (:class:`backend.images.HostPolicy`) resolves a task image's host and refuses
private, loopback and link-local addresses before any request. The HTTP client then resolves the
name again to connect, so a name whose DNS answer changes in between (DNS rebinding: public for
the check, ``127.0.0.1`` or ``169.254.169.254`` for the connection) would reach an internal
service. :func:`public_peer_session` closes that gap: its connections look at the address they
actually connected to (``getpeername``) and close the socket before sending a byte when it is not
public. Behind an HTTP(S) proxy (``HTTP_PROXY`` / ``HTTPS_PROXY``) the proxy resolves the name and
only the policy's own resolution applies.
"""

from __future__ import annotations

import ipaddress
import socket

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection

__all__ = ["NonPublicPeerError", "is_public_address", "non_public_peer", "public_peer_session"]


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast IP address (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class NonPublicPeerError(OSError):
    """The connection reached a non-public address; ``address`` is that peer's IP."""

    def __init__(self, address: str) -> None:
        super().__init__(f"connected to the non-public address {address}")
        self.address = address


class _PublicPeerMixin:
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        address = sock.getpeername()[0]
        if not is_public_address(address):
            sock.close()
            raise NonPublicPeerError(address)
        return sock


class _PublicPeerHTTPConnection(_PublicPeerMixin, HTTPConnection):
    pass


class _PublicPeerHTTPSConnection(_PublicPeerMixin, HTTPSConnection):
    pass


class _PublicPeerHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PublicPeerHTTPConnection


class _PublicPeerHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PublicPeerHTTPSConnection


class _PublicPeerAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - HTTPAdapter's signature
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicPeerHTTPPool, "https": _PublicPeerHTTPSPool}


def public_peer_session() -> requests.Session:
    """A ``requests.Session`` whose direct connections refuse non-public peers
    (:class:`NonPublicPeerError` inside the ``requests.ConnectionError`` it raises)."""
    session = requests.Session()
    adapter = _PublicPeerAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def non_public_peer(error: BaseException) -> str | None:
    """The refused peer address if ``error`` (a requests / urllib3 exception) came from
    :class:`NonPublicPeerError`, else None."""
    seen: set[int] = set()
    pending: list[object] = [error]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NonPublicPeerError):
            return current.address
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return None
