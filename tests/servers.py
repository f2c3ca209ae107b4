"""A small loopback HTTP server for tests, the demo corpus and benchmarks.

`serve(routes)` starts a threaded server bound to 127.0.0.1 on a free port and yields its base URL:

    with serve({"/a.jpg": Route(200, {"Content-Type": "image/jpeg"}, jpeg_bytes)}) as base:
        urllib.request.urlopen(base + "/a.jpg")

A route maps a path (with its query string, if any) to a `Route` (status, headers, body, delay in seconds
before the response), to a plain `(status, headers, body[, delay])` tuple, or to a list of those served in
turn, the last one repeating (a flaky server: 503 first, then the image). Unknown paths get 404. Paths
that are not URL-safe (spaces, non-ASCII) are matched on their percent-decoded form, so a route can be
written as `"/a b.jpg"` and requested as `"/a%20b.jpg"`. `hits` counts requests per path so tests can check
that a duplicate URL was fetched once, or that a retry happened.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass(frozen=True)
class Route:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before sending the response (to exceed a client timeout)
    # Send only this many bytes of `body` while announcing its full Content-Length (a cut-off transfer).
    # (A "Content-Length": "" header omits the length: the body then ends when the connection closes.)
    truncate_to: int | None = None


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow handler never blocks shutdown
    allow_reuse_address = True

    def __init__(self, routes: Mapping[str, Route | tuple | list]):
        self.routes = {_key(p): _routes(r) for p, r in routes.items()}
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, path: str) -> int:
        """Record a request; returns how many earlier requests this path had."""
        with self._lock:
            self.hits[path] += 1
            return self.hits[path] - 1


def _key(path: str) -> str:
    return unquote(path if path.startswith("/") else "/" + path)


def _routes(r: Route | tuple | list) -> list[Route]:
    items = r if isinstance(r, list) else [r]
    if not items:
        raise ValueError("a route list needs at least one response")
    return [x if isinstance(x, Route) else Route(*x) for x in items]


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = _key(self.path)
        earlier = self.server.count(path)
        responses = self.server.routes.get(path)
        if responses is None:
            route = Route(404, {"Content-Type": "text/plain"}, b"not found")
        else:
            route = responses[min(earlier, len(responses) - 1)]
        if route.delay:
            time.sleep(route.delay)
        try:
            self.send_response(route.status)
            headers = dict(route.headers)
            headers.setdefault("Content-Length", str(len(route.body)))
            if headers["Content-Length"] == "":
                del headers["Content-Length"]  # no length: the body ends when the connection closes
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Connection", "close")
            self.end_headers()
            body = route.body if route.truncate_to is None else route.body[: route.truncate_to]
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test): nothing to report
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output quiet


@contextmanager
def serve(routes: Mapping[str, Route | tuple | list]) -> Iterator[str]:
    """Serve `routes` on 127.0.0.1:<free port> in a background thread; yields the base URL."""
    with serving(routes) as server:
        yield server.base_url


@contextmanager
def serving(routes: Mapping[str, Route | tuple | list]) -> Iterator[LoopbackServer]:
    """Like `serve`, but yields the server itself (for `base_url` and `hits`)."""
    server = LoopbackServer(routes)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """A loopback URL on a port nothing listens on (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- an S3 server on loopback (moto in server mode) ---------------------------------------------------------

S3_ENV = {
    # Dummy credentials and the standard endpoint variable: botocore (inside s3fs and boto3) reads them, as
    # it would read a user's; nothing in a config names them.
    "AWS_ACCESS_KEY_ID": "webbody-test-key",
    "AWS_SECRET_ACCESS_KEY": "webbody-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never probe the instance-metadata address for credentials
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_environment(port: int) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


@contextmanager
def moto_s3(port: int | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Run moto's S3 server (`python -m moto.server`) on 127.0.0.1:<port> in a child process; yields the
    endpoint URL. The caller points AWS_ENDPOINT_URL at it (see `s3_environment`)."""
    import sys
    import urllib.request

    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_bucket(name: str) -> str:
    """Create a bucket on the configured endpoint (through s3fs, as users' code would); returns `s3://name`."""
    from pipeline import storage

    fs = storage.filesystem("s3")
    fs.mkdir(name)
    return f"s3://{name}"
