"""Fetching an input image from an http(s) URL without letting the URL reach inside the network.

Off unless `limits.image_url_fetch` is set (docs/contract.md, img2img). When on, a URL is a request
the server makes on a client's behalf, so every hop is checked the same way: the host is resolved
once, every address it resolves to must be public (no loopback, private, link-local — the cloud
metadata service —, CGNAT, multicast, reserved or unspecified address, nor an IPv6 form that embeds
an IPv4 one), and the connection goes to the address that was checked, never to a second lookup
that DNS could answer differently. Redirects are followed by hand, at most three, each one checked
again. Connect 5 s, 15 s for the whole fetch (checked after every read, each of at most 2 s), at
most `limits.image_max_bytes` read.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from server.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0
# The whole fetch is checked against its deadline after every network read, and no single read may
# wait longer than this: a server that trickles its body is cut off within this much of the deadline.
READ_TIMEOUT_S = 2.0
TOTAL_TIMEOUT_S = 15.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# IPv6 prefixes that carry an IPv4 address inside (mapped, compatible, NAT64, 6to4, Teredo): a
# gateway may route them to that IPv4 address, so they are refused whatever it is.
_EMBEDS_IPV4 = tuple(
    ipaddress.IPv6Network(net)
    for net in ("::ffff:0:0/96", "::/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32")
)


def public_address(address: IPAddress) -> bool:
    """Whether the server may connect to `address` on a client's behalf."""
    if isinstance(address, ipaddress.IPv6Address) and any(address in net for net in _EMBEDS_IPV4):
        return False
    # is_global alone misses some multicast ranges (224.0.1.0/24 is global multicast).
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified or address.is_link_local
    )


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as the C library resolves it (so "2130706433" and "0x7f.1" are
    127.0.0.1 here exactly as they would be to a connect)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidRequest(f"image: the URL's host {host!r} does not resolve ({exc})") from None
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, kw_only=True)
class UrlFetcher:
    max_bytes: int
    allowed_hosts: tuple[str, ...] = ()
    resolver: Resolver = system_resolver
    # Which resolved addresses may be connected to; tests widen it to reach their own loopback server.
    may_connect: Callable[[IPAddress], bool] = public_address
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    total_timeout_s: float = TOTAL_TIMEOUT_S
    # The certificates https is verified against: the system's by default; tests give their own CA.
    tls: ssl.SSLContext | None = None
    _hosts: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hosts", frozenset(_normal_host(h) for h in self.allowed_hosts))

    def fetch(self, url: str) -> bytes:
        """The body of `url` after at most three checked redirects; InvalidRequest (422) otherwise."""
        deadline = time.monotonic() + self.total_timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = self._one_hop(url, deadline)
            if location is None:
                if not 200 <= status < 300:
                    raise InvalidRequest(f"image: the URL answered HTTP {status}")
                return body
            url = urljoin(url, location)
        raise InvalidRequest(f"image: the URL redirected more than {MAX_REDIRECTS} times")

    def _checked_address(self, url: str) -> tuple[str, str, int, IPAddress]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidRequest(f"image: only http and https URLs are fetched, not {scheme or 'none'!r}")
        if parts.username or parts.password:
            raise InvalidRequest("image: URLs with credentials are not fetched")
        host = _normal_host(parts.hostname or "")
        if not host:
            raise InvalidRequest("image: the URL has no host")
        if self._hosts and host not in self._hosts:
            raise InvalidRequest(f"image: the host {host!r} is not among the hosts this server fetches from")
        try:
            port = parts.port if parts.port is not None else (443 if scheme == "https" else 80)
        except ValueError:
            raise InvalidRequest("image: the URL's port is not a number from 0 to 65535") from None
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in self.resolver(host, port)]
        if not addresses:
            raise InvalidRequest(f"image: the URL's host {host!r} does not resolve")
        # Every answer must be public: DNS may hand a later lookup (ours or a library's) any of them.
        for address in addresses:
            if not self.may_connect(address):
                raise InvalidRequest(
                    f"image: the URL's host {host!r} is a private, loopback or otherwise non-public "
                    "address; only public hosts are fetched"
                )
        return scheme, host, port, addresses[0]

    def _one_hop(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        scheme, host, port, address = self._checked_address(url)
        parts = urlsplit(url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = f"{scheme}://{literal}:{port}{parts.path or '/'}" + (
            f"?{parts.query}" if parts.query else ""
        )
        default_port = port == (443 if scheme == "https" else 80)
        headers = {"Host": host if default_port else f"{host}:{port}", "Accept": "image/*"}
        # Connect to the checked address; TLS still names and verifies the URL's host.
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        left = self._remaining(deadline)
        timeout = httpx.Timeout(min(READ_TIMEOUT_S, left), connect=min(self.connect_timeout_s, left))
        try:
            with (
                httpx.Client(
                    timeout=timeout, follow_redirects=False, trust_env=False, verify=self.tls or True
                ) as client,
                client.stream("GET", target, headers=headers, extensions=extensions) as response,
            ):
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidRequest(
                            f"image: the URL answered HTTP {response.status_code} with no Location"
                        )
                    return response.status_code, location, b""
                if not 200 <= response.status_code < 300:
                    return response.status_code, None, b""
                return response.status_code, None, self._read(response, deadline)
        except httpx.TimeoutException:
            raise InvalidRequest(f"image: the URL did not answer within {self.total_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"image: the URL could not be fetched ({type(exc).__name__})") from None

    def _read(self, response: httpx.Response, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidRequest(self._too_large())
        body = bytearray()
        # No chunk size: each network read comes back at once, so the deadline is checked per read.
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise InvalidRequest(self._too_large())
            self._remaining(deadline)
        return bytes(body)

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise InvalidRequest(f"image: the URL did not answer within {self.total_timeout_s:g} s")
        return left

    def _too_large(self) -> str:
        return f"image: the URL's body is larger than the limit of {self.max_bytes} bytes"


def _normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()
