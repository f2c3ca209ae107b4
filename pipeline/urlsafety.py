"""Refuse URLs that point into private networks (SSRF guard) and schemes other than http(s).

A scraped URL list is untrusted input: a URL naming `http://169.254.169.254/` (cloud metadata), a router at
`192.168.0.1` or a service on `localhost` must not be fetched by a build machine. The check runs twice:

1. `check_url` (before download): scheme, host, and every address the host resolves to.
2. `install_guarded_opener()` (in each process that runs download tasks): urllib's global opener is
   replaced by one that repeats the check on every request it opens, redirects included, and connects only
   to the address it vetted, so a DNS answer that changes between the check and the connect (rebinding)
   cannot slip through. Only http and https handlers are installed: `file://`, `ftp://` and `data:` URLs
   fail with "unknown url type".

Residual risk (documented in docs/download.md): with an HTTP(S) proxy configured through the environment,
the proxy resolves the target itself, so the target's name is checked before each request and redirect,
but a DNS answer that changes between our lookup and the proxy's is not caught.

`allow` is an explicit allow-list (config `download.allow_private_hosts`): host names, addresses or CIDR
networks, e.g. `["127.0.0.1"]` for tests and the demo, which serve from loopback.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Iterable
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
PRIVATE_CODE = "private_address"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedURL(OSError):
    """Raised (inside urllib) for a refused address; its message starts with a short code."""


class AllowList:
    """Host names and networks that may be fetched even though they are not public."""

    def __init__(self, entries: Iterable[str] = ()):
        self.hosts: set[str] = set()
        self.networks: list[IPNetwork] = []
        for e in entries:
            e = e.strip().lower()
            if not e:
                continue
            try:
                self.networks.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                self.hosts.add(e.rstrip("."))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.networks if net.version == ip.version)

    def as_list(self) -> list[str]:
        return sorted(self.hosts) + [str(n) for n in self.networks]


def why_not_public(ip: IPAddress) -> str | None:
    """The kind of non-public address `ip` is, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    for attr in ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_unspecified", "is_reserved"):
        if getattr(ip, attr):
            return attr[3:]
    if not ip.is_global:
        return "not_global"  # e.g. 100.64.0.0/10 carrier-grade NAT
    return None


def resolve(host: str, port: int | None) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]").split("%")[0])]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port or 80, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


def check_host(host: str, port: int | None, allow: AllowList) -> list[IPAddress]:
    """The addresses of `host` if every one may be fetched; raises BlockedURL otherwise."""
    if allow.allows_host(host):
        return resolve(host, port)
    ips = resolve(host, port)
    if not ips:
        raise BlockedURL(f"dns_error: {host} has no address")
    for ip in ips:
        kind = why_not_public(ip)
        if kind and not allow.allows_ip(ip):
            raise BlockedURL(f"{PRIVATE_CODE}: {host} resolves to {ip} ({kind})")
    return ips


def check_url(url: str, allow: AllowList, resolve_dns: bool = True) -> str | None:
    """A short reason code when `url` must not be fetched (bad_url, private_address, dns_error), else None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "bad_url"
    if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
        return "bad_url"
    if not resolve_dns and not _is_ip_literal(parts.hostname):
        return None  # host names are vetted at connect time (install_guarded_opener)
    try:
        check_host(parts.hostname, port, allow)
    except BlockedURL as exc:
        return str(exc).split(":", 1)[0]
    except (OSError, UnicodeError):
        return "dns_error"
    return None


# -- the guarded urllib opener used inside img2dataset's download processes ---------------------------


def _guarded_create_connection(allow: AllowList):
    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):  # noqa: SLF001
        host, port = address
        ips = check_host(host, port, allow)
        err: OSError | None = None
        for ip in ips:  # connect to a vetted address only (no second DNS lookup)
            try:
                return socket.create_connection((str(ip), port), timeout, source_address)
            except OSError as exc:
                err = exc
        raise err or OSError(f"cannot connect to {host}")

    return create_connection


def _connection_class(base: type[http.client.HTTPConnection], allow: AllowList):
    class Guarded(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = _guarded_create_connection(allow)

    return Guarded


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow: AllowList):
        super().__init__()
        self._conn = _connection_class(http.client.HTTPConnection, allow)

    def http_open(self, req):
        return self.do_open(self._conn, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow: AllowList):
        super().__init__()
        self._conn = _connection_class(http.client.HTTPSConnection, allow)

    def https_open(self, req):
        return self.do_open(self._conn, req, context=self._context)


class _RedirectCheck(urllib.request.HTTPRedirectHandler):
    """Vet the redirect target's name before following (the connect-time check vets its address)."""

    def __init__(self, allow: AllowList):
        self.allow = allow

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        parts = urlsplit(newurl)
        if parts.scheme.lower() not in ALLOWED_SCHEMES or not parts.hostname:
            raise BlockedURL(f"bad_url: redirect to {newurl!r}")
        check_host(parts.hostname, parts.port, self.allow)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _ProxiedNameCheck(urllib.request.BaseHandler):
    """With a proxy the connect-time check sees the proxy: vet the target's name before each request."""

    handler_order = 100  # before ProxyHandler rewrites the request's host

    def __init__(self, allow: AllowList):
        self.allow = allow

    def _check(self, req):
        parts = urlsplit(req.full_url)
        if parts.hostname:
            check_host(parts.hostname, parts.port, self.allow)
        return req

    http_request = https_request = _check


class _CappedResponse:
    """A response whose body may not exceed `cap` bytes (a server streaming gigabytes is cut off)."""

    def __init__(self, response, cap: int):
        self._response = response
        self._cap = cap
        self._read = 0

    def read(self, amt: int | None = None) -> bytes:
        if amt is None and getattr(self._response, "length", None) is not None:
            # A Content-Length (already checked against the cap): a plain read keeps http.client's
            # IncompleteRead for a transfer cut short.
            data = self._response.read()
            self._read += len(data)
            return data
        if amt is None:  # no length (chunked, or until close): read in pieces, stop past the cap
            parts = []
            while piece := self.read(1 << 16):
                parts.append(piece)
            return b"".join(parts)
        data = self._response.read(min(amt, self._cap + 1 - self._read))
        self._read += len(data)
        if self._read > self._cap:
            self._response.close()
            raise BlockedURL(f"body_too_large: more than {self._cap} bytes")
        return data

    def __getattr__(self, name):
        return getattr(self._response, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._response.close()


class _BodyCap(urllib.request.BaseHandler):
    handler_order = 1100  # after HTTPErrorProcessor: only the final, successful response is wrapped

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_response(self, req, response):
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise BlockedURL(f"body_too_large: Content-Length {length} > {self.max_bytes}")
        return _CappedResponse(response, self.max_bytes)

    https_response = http_response


def build_guarded_opener(allow: Iterable[str] = (), max_body_bytes: int | None = None) -> urllib.request.OpenerDirector:
    al = AllowList(allow)
    opener = urllib.request.OpenerDirector()
    if urllib.request.getproxies():
        opener.add_handler(_ProxiedNameCheck(al))
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _GuardedHTTPHandler(al),
        _GuardedHTTPSHandler(al),
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectCheck(al),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    if max_body_bytes:
        opener.add_handler(_BodyCap(max_body_bytes))
    return opener


_installed: tuple | None = None


def install_guarded_opener(allow: Iterable[str] = (), max_body_bytes: int | None = None) -> None:
    """Make `urllib.request.urlopen` (used by img2dataset) go through the guarded opener in this process."""
    global _installed
    key = (tuple(sorted(allow)), max_body_bytes)
    if _installed == key:
        return
    urllib.request.install_opener(build_guarded_opener(key[0], max_body_bytes))
    _installed = key
