"""Fetching an input image from an http(s) URL without becoming an SSRF proxy.

Rules (all checked before any connection is opened):
  * scheme http or https only; no user:password@ in the URL;
  * the host name is resolved once, and EVERY address must be public (``ip.is_global`` and not
    multicast; IPv4-mapped IPv6 is unwrapped first), unless the host or address is allowlisted;
  * the connection goes to the vetted address itself (Host header and TLS SNI / certificate check
    still use the name), so a second DNS answer (rebinding) cannot redirect it;
  * redirects are followed by hand, at most ``max_redirects``, each hop vetted like the first;
  * the body is capped at ``max_bytes`` (Content-Length and while reading) and the whole fetch at
    ``policy.timeout_s``.

``resolve`` and ``connect`` are injectable so tests can prove that refusal happens before any
connection (no traffic leaves the machine).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit

Resolver = Callable[[str, int], list[str]]
Connector = Callable[[str, int, float], socket.socket]

REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """The URL was refused or could not be fetched; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image_url"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class FetchPolicy:
    enabled: bool = True
    timeout_s: float = 10.0
    max_redirects: int = 3
    # Host names (exact, case-insensitive), IP addresses or CIDR networks that may be non-public.
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)

    def allowed_networks(self) -> list:
        nets = []
        for entry in self.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                pass
        return nets


def default_resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot resolve the image URL's host {host!r} ({e})") from None
    out: list[str] = []
    for info in infos:
        addr = info[4][0].split("%", 1)[0]  # drop an IPv6 zone id
        if addr not in out:
            out.append(addr)
    return out


def default_connect(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout=timeout)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None and not is_public(inner):
            return False
    return ip.is_global and not ip.is_multicast


def vet(host: str, addresses: list[str], policy: FetchPolicy) -> list[str]:
    """The addresses that may be contacted; raises FetchError if any address is refused."""
    if not addresses:
        raise FetchError(f"the image URL's host {host!r} has no address")
    if host.lower().rstrip(".") in {h.lower().rstrip(".") for h in policy.allow_hosts}:
        return addresses
    nets = policy.allowed_networks()
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise FetchError(f"the image URL's host {host!r} resolved to an invalid address") from None
        plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if any(plain.version == n.version and plain in n for n in nets):
            continue
        if not is_public(ip):
            raise FetchError(
                f"image URLs may not point at loopback, private, link-local, multicast or reserved addresses "
                f"({host} resolves to one); send the image as base64 instead", code="url_refused")
    return addresses


class _Conn(http.client.HTTPConnection):
    """An HTTP connection over a socket we opened to a vetted address."""

    def __init__(self, host: str, port: int, sock: socket.socket, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.sock = sock

    def connect(self):  # never re-resolve
        raise http.client.NotConnected()


def fetch(url: str, policy: FetchPolicy, max_bytes: int, resolve: Resolver = default_resolve,
          connect: Connector = default_connect) -> bytes:
    if not policy.enabled:
        raise FetchError("this server does not fetch image URLs; send the image as base64", code="url_refused")
    deadline = time.monotonic() + policy.timeout_s
    for hop in range(policy.max_redirects + 1):
        status, location, body = _fetch_once(url, policy, max_bytes, resolve, connect, deadline)
        if status in REDIRECTS:
            if not location:
                raise FetchError(f"the image URL redirected (HTTP {status}) without a Location")
            url = urljoin(url, location)
            continue
        return body
    raise FetchError(f"the image URL redirected more than {policy.max_redirects} times")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("fetching the image URL timed out", code="url_timeout")
    return left


def _fetch_once(url: str, policy: FetchPolicy, max_bytes: int, resolve: Resolver, connect: Connector,
                deadline: float) -> tuple[int, str | None, bytes]:
    if len(url) > 4096:
        raise FetchError("the image URL is longer than 4096 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"the image URL is malformed ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("image URLs must use http or https", code="url_refused")
    if parts.username is not None or parts.password is not None:
        raise FetchError("image URLs may not contain a user name or password", code="url_refused")
    host = parts.hostname
    if not host:
        raise FetchError("the image URL has no host")
    port = port or (443 if scheme == "https" else 80)
    addresses = vet(host, resolve(host, port), policy)

    sock = None
    last_err: Exception | None = None
    for ip in addresses:
        try:
            sock = connect(ip, port, min(_left(deadline), policy.timeout_s))
            break
        except OSError as e:
            last_err = e
    if sock is None:
        raise FetchError(f"cannot connect to the image URL's host ({last_err})", code="url_unreachable")
    try:
        sock.settimeout(max(0.05, min(_left(deadline), policy.timeout_s)))
        if scheme == "https":
            ctx = ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
        conn = _Conn(host, port, sock, timeout=policy.timeout_s)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("GET", path, headers={"User-Agent": "sd3trt-server", "Accept": "image/*",
                                           "Accept-Encoding": "identity", "Connection": "close"})
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            raise FetchError(f"the image URL answered HTTP {resp.status}", code="url_failed")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"the image at the URL is larger than {max_bytes} bytes", status=413,
                             code="image_too_large")
        chunks, total = [], 0
        while True:
            _left(deadline)  # each read is bounded by the socket timeout, the whole body by the deadline
            chunk = resp.read(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"the image at the URL is larger than {max_bytes} bytes", status=413,
                                 code="image_too_large")
            chunks.append(chunk)
        return 200, None, b"".join(chunks)
    except FetchError:
        raise
    except (socket.timeout, TimeoutError):
        raise FetchError("fetching the image URL timed out", code="url_timeout") from None
    except (OSError, http.client.HTTPException, ssl.SSLError) as e:
        raise FetchError(f"fetching the image URL failed ({type(e).__name__})", code="url_failed") from None
    finally:
        try:
            sock.close()
        except OSError:
            pass
