"""Image URLs as an attacker would send them: no address inside the network is ever connected to.

A real HTTP server on loopback plays the remote host. Loopback is itself refused by the real rule,
so the tests that must reach it widen the rule by exactly that one address (port included nowhere
else) and check that everything else, including every redirect, still goes through the real rule.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.config import LimitSettings
from server.errors import InvalidRequest
from server.image_fetch import IPAddress, Resolver, UrlFetcher, public_address
from server.image_input import read_image

PNG = (Path(__file__).parent.parent / "data" / "images" / "landscape.png").read_bytes()
SERVER_ADDRESS = ipaddress.ip_address("127.0.0.1")


class Remote(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server spelling)
        Remote.hits.append(f"{self.headers.get('Host')} {self.path}")
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect?to="))
            self.end_headers()
        elif self.path.startswith("/loop"):
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold on the stream itself
            self.wfile.write(b"\0" * 300_000)
        elif self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):  # a byte every 0.1 s: no read ever times out, the whole fetch must
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/missing":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def resolver(names: dict[str, str]) -> Resolver:
    """DNS as the attacker configures it; literal addresses and other names resolve for real."""
    from server.image_fetch import system_resolver

    def resolve(host: str, port: int) -> list[str]:
        return [names[host]] if host in names else system_resolver(host, port)

    return resolve


def also_our_server(address: IPAddress) -> bool:
    return address == SERVER_ADDRESS or public_address(address)


def refused(fetcher: UrlFetcher, url: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        fetcher.fetch(url)
    return caught.value.message


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
        "100.64.0.1", "0.0.0.0", "224.0.0.1", "224.0.1.1", "239.255.255.250", "240.0.0.1",
        "255.255.255.255", "192.0.2.1", "198.18.0.1", "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:8.8.8.8", "::127.0.0.1", "64:ff9b::a00:1",
        "2002:7f00:1::1", "2001:0:4136:e378::1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001", "127.1",
        "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]", "localhost",
        "169.254.169.254", "0.0.0.0", "0",
    ],
)  # fmt: skip
def test_loopback_in_any_spelling_is_never_connected_to(host: str, port: int) -> None:
    Remote.hits.clear()
    message = refused(UrlFetcher(max_bytes=10**6), f"http://{host}:{port}/image.png")
    assert "non-public" in message or "does not resolve" in message
    assert Remote.hits == []


def test_a_name_that_resolves_to_a_private_address_is_refused(port: int) -> None:
    fetcher = UrlFetcher(max_bytes=10**6, resolver=resolver({"cdn.example": "10.0.0.7"}))
    assert "non-public" in refused(fetcher, f"http://cdn.example:{port}/image.png")


def test_a_public_image_is_fetched_from_the_checked_address_with_its_host_name(port: int) -> None:
    Remote.hits.clear()
    fetcher = UrlFetcher(
        max_bytes=10**6, resolver=resolver({"images.example": "127.0.0.1"}), may_connect=also_our_server
    )
    assert fetcher.fetch(f"http://images.example:{port}/image.png") == PNG
    assert Remote.hits == [f"images.example:{port} /image.png"]


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2:{port}/image.png", "http://2130706434:{port}/image.png", "http://[::1]:{port}/x",
     "http://internal.example:{port}/image.png", "ftp://images.example/x.png"],
)  # fmt: skip
def test_every_redirect_is_checked_again(target: str, port: int) -> None:
    Remote.hits.clear()
    fetcher = UrlFetcher(
        max_bytes=10**6,
        resolver=resolver({"images.example": "127.0.0.1", "internal.example": "192.168.0.10"}),
        may_connect=also_our_server,
    )
    location = target.format(port=port)
    message = refused(fetcher, f"http://images.example:{port}/redirect?to={location}")
    assert "non-public" in message or "only http and https" in message
    assert len(Remote.hits) == 1  # the redirect itself, and nothing after it


def test_at_most_three_redirects(port: int) -> None:
    fetcher = UrlFetcher(
        max_bytes=10**6, resolver=resolver({"images.example": "127.0.0.1"}), may_connect=also_our_server
    )
    assert "more than 3 times" in refused(fetcher, f"http://images.example:{port}/loop")


def test_a_body_over_the_limit_is_cut_off_while_streaming(port: int) -> None:
    fetcher = UrlFetcher(
        max_bytes=100_000, resolver=resolver({"images.example": "127.0.0.1"}), may_connect=also_our_server
    )
    assert "larger than the limit of 100000 bytes" in refused(fetcher, f"http://images.example:{port}/big")


def test_a_trickling_body_is_cut_off_at_the_total_deadline(port: int) -> None:
    fetcher = UrlFetcher(
        max_bytes=10**6,
        resolver=resolver({"images.example": "127.0.0.1"}),
        may_connect=also_our_server,
        total_timeout_s=1.0,
    )
    started = time.monotonic()
    assert "did not answer within 1 s" in refused(fetcher, f"http://images.example:{port}/trickle")
    assert time.monotonic() - started < 2.0


def test_an_error_status_is_a_422(port: int) -> None:
    fetcher = UrlFetcher(
        max_bytes=10**6, resolver=resolver({"images.example": "127.0.0.1"}), may_connect=also_our_server
    )
    assert "answered HTTP 404" in refused(fetcher, f"http://images.example:{port}/missing")


def test_the_host_allow_list_holds_for_redirects_too(port: int) -> None:
    names = {"images.example": "127.0.0.1", "other.example": "127.0.0.1"}
    fetcher = UrlFetcher(
        max_bytes=10**6,
        allowed_hosts=("Images.Example.",),
        resolver=resolver(names),
        may_connect=also_our_server,
    )
    assert fetcher.fetch(f"http://images.example:{port}/image.png") == PNG
    assert "not among the hosts" in refused(fetcher, f"http://other.example:{port}/image.png")
    redirect = f"http://images.example:{port}/redirect?to=http://other.example:{port}/image.png"
    assert "not among the hosts" in refused(fetcher, redirect)


def test_with_fetching_on_a_url_field_decodes_like_base64(port: int) -> None:
    fetcher = UrlFetcher(
        max_bytes=10**6, resolver=resolver({"images.example": "127.0.0.1"}), may_connect=also_our_server
    )
    limits = LimitSettings(image_url_fetch=True)
    by_url = read_image(f"http://images.example:{port}/image.png", limits, fetcher=fetcher)
    by_value = read_image(base64.b64encode(PNG).decode(), limits)
    assert (by_url.pixels == by_value.pixels).all()
    # And with the default fetcher (the real rule), the same server on loopback is refused.
    with pytest.raises(InvalidRequest, match="non-public"):
        read_image(f"http://127.0.0.1:{port}/image.png", limits)


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ssl.SSLContext]]:
    """An https server on loopback whose certificate names images.example only, and a client context
    that trusts it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert_file, key_file)
    server.socket = server_side.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_side = ssl.create_default_context(cafile=str(cert_file))
    try:
        yield server.server_address[1], client_side
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_https_to_the_checked_address_still_verifies_the_url_host(
    tls_port: tuple[int, ssl.SSLContext],
) -> None:
    port, trusted = tls_port
    names = {"images.example": "127.0.0.1", "other.example": "127.0.0.1"}
    fetcher = UrlFetcher(max_bytes=10**6, resolver=resolver(names), may_connect=also_our_server, tls=trusted)
    assert fetcher.fetch(f"https://images.example:{port}/image.png") == PNG
    # Same address, but the certificate does not name this host: refused, as a plain client would.
    assert "could not be fetched" in refused(fetcher, f"https://other.example:{port}/image.png")
