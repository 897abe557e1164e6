"""Fetching an input image from an http(s) URL without becoming an SSRF proxy.

Rules (all checked before any connection is opened):
  * scheme http or https only; no user:password@ in the URL;
  * the host name is resolved once, and EVERY address must be public, unless the host or address is
    allowlisted. IPv4: ``is_global`` and not multicast. IPv6: only global unicast (2000::/3, and
    ``is_global``); an IPv4 address carried inside IPv6 (mapped, compatible, translated, 6to4, Teredo,
    NAT64 well-known 64:ff9b::/96 and local-use 64:ff9b:1::/48) is unwrapped and judged by the IPv4
    rules instead, so ``[::169.254.169.254]`` or ``[64:ff9b:1::a9fe:a9fe]`` is refused like
    169.254.169.254;
  * the connection goes to the vetted address itself (Host header and TLS SNI / certificate check
    still use the name), so a second DNS answer (rebinding) cannot redirect it;
  * redirects are followed by hand, at most ``max_redirects``, each hop vetted like the first;
  * the body is capped at ``max_bytes`` (Content-Length and while reading);
  * one ``Deadline`` covers the whole fetch (every hop: connect, headers, body). It is enforced on the
    socket: when it passes, a timer shuts the socket down, which ends a blocked read at once, however
    slowly the other side drips bytes. ``Deadline.cancel()`` does the same on demand (shutdown).

``resolve`` and ``connect`` are injectable so tests can prove that refusal happens before any
connection (no traffic leaves the machine).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
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


_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (also :: and ::1)
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # the operator picks the prefix length (RFC 8215)


def _rfc6052(ip: ipaddress.IPv6Address, prefix_len: int) -> ipaddress.IPv4Address:
    """The IPv4 address embedded after a NAT64 prefix of ``prefix_len`` bits (RFC 6052 layouts)."""
    b = ip.packed
    if prefix_len == 96:
        return ipaddress.IPv4Address(b[12:16])
    skip_u = b[:8] + b[9:]  # bits 64..71 (the "u" octet) never carry address bits
    return ipaddress.IPv4Address(skip_u[prefix_len // 8:prefix_len // 8 + 4])


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address carries (every candidate, when the layout is the operator's
    choice), or None when it carries none."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED or ip in _NAT64_WELL_KNOWN:
        return [_rfc6052(ip, 96)]
    if ip in _NAT64_LOCAL:
        return [_rfc6052(ip, n) for n in (48, 56, 64, 96)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # the Teredo server and the (de-obfuscated) client
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return all(is_public(v4) for v4 in inner)
        return ip in _GLOBAL_UNICAST and ip.is_global and not ip.is_reserved
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
                f"image URLs may not point at loopback, private, link-local, site-local, multicast or reserved "
                f"addresses ({host} resolves to one); send the image as base64 instead", code="url_refused")
    return addresses


class _Conn(http.client.HTTPConnection):
    """An HTTP connection over a socket we opened to a vetted address."""

    def __init__(self, host: str, port: int, sock: socket.socket, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.sock = sock

    def connect(self):  # never re-resolve
        raise http.client.NotConnected()


class Deadline:
    """One deadline for a whole fetch, enforced on the socket: at the deadline (or on ``cancel()``) a
    timer shuts the current socket down, so a read blocked on a peer that drips bytes ends at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self.expired = False
        self.cancelled = False

    def left(self) -> float:
        """Seconds left; raises FetchError when none are (or the fetch was cancelled)."""
        if self.cancelled:
            raise FetchError("the server is shutting down; retry later", status=503, code="shutting_down")
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise FetchError(f"fetching the image URL took longer than {self.seconds:g} s; use a faster host "
                             "or send the image as base64", code="url_timeout")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Enforce the deadline on ``sock`` (the socket in use now) from here on."""
        with self._lock:
            self._sock = sock
            if self.expired or self.cancelled:
                _shut(sock)
            elif self._timer is None:
                self._timer = threading.Timer(max(0.0, self.at - time.monotonic()), self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                _shut(self._sock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._sock is not None:
                _shut(self._sock)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._sock = None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fetch(url: str, policy: FetchPolicy, max_bytes: int, resolve: Resolver = default_resolve,
          connect: Connector = default_connect, deadline: Deadline | None = None) -> bytes:
    """The image bytes at ``url``; raises FetchError. ``deadline`` (default: ``policy.timeout_s`` from
    now) bounds the whole fetch, redirects included."""
    if not policy.enabled:
        raise FetchError("this server does not fetch image URLs; send the image as base64", code="url_refused")
    deadline = deadline or Deadline(policy.timeout_s)
    try:
        for _hop in range(policy.max_redirects + 1):
            status, location, body = _fetch_once(url, policy, max_bytes, resolve, connect, deadline)
            if status in REDIRECTS:
                if not location:
                    raise FetchError(f"the image URL redirected (HTTP {status}) without a Location")
                url = urljoin(url, location)
                continue
            return body
    finally:
        deadline.close()
    raise FetchError(f"the image URL redirected more than {policy.max_redirects} times")


def _fetch_once(url: str, policy: FetchPolicy, max_bytes: int, resolve: Resolver, connect: Connector,
                deadline: Deadline) -> tuple[int, str | None, bytes]:
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
            sock = connect(ip, port, deadline.left())
            break
        except OSError as e:
            last_err = e
    if sock is None:
        deadline.left()  # a connect cut short by the deadline is a timeout
        raise FetchError(f"cannot connect to the image URL's host ({last_err})", code="url_unreachable")
    try:
        deadline.watch(sock)
        sock.settimeout(deadline.left())
        if scheme == "https":
            ctx = ssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
            deadline.watch(sock)
        conn = _Conn(host, port, sock, timeout=deadline.left())
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
        body, total = bytearray(), 0
        while True:
            deadline.left()
            chunk = resp.read1(65536)  # what has arrived (read() would wait for 64 KiB)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"the image at the URL is larger than {max_bytes} bytes", status=413,
                                 code="image_too_large")
            body += chunk
        deadline.left()  # a body cut short by the deadline is a timeout, not a short image
        return 200, None, bytes(body)
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError) as e:
        deadline.left()  # the deadline shut the socket: a timeout
        if isinstance(e, (socket.timeout, TimeoutError)):
            raise FetchError("fetching the image URL timed out", code="url_timeout") from None
        raise FetchError(f"fetching the image URL failed ({type(e).__name__})", code="url_failed") from None
    finally:
        try:
            sock.close()
        except OSError:
            pass
