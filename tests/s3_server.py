"""A local S3-compatible server for the tests: moto's server mode on 127.0.0.1, behind a proxy that can
stall or fail chosen objects and counts what it serves.

The proxy forwards every request unchanged (moto does not check signatures) and, per object key substring,
can answer ``500`` to the first ``n`` GETs or hold a GET without answering (a stalled server) until the
test ends. It counts GETs and body bytes per key and the most GETs in flight at once.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from moto.server import ThreadedMotoServer


@dataclass
class Faults:
    """What the proxy does to GETs of keys containing a substring."""

    fail_first: dict[str, int] = field(default_factory=dict)  # substring -> GETs answered 500 first
    stall: set[str] = field(default_factory=set)  # substrings whose GETs are never answered
    gets: Counter[str] = field(default_factory=Counter)  # key -> GETs forwarded or failed
    bytes_served: Counter[str] = field(default_factory=Counter)  # key -> body bytes sent
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class S3:
    """A running server: its endpoint, the fsspec ``storage_options`` to reach it, and the proxy's faults."""

    endpoint: str
    faults: Faults

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            # botocore's own retries off: the tests look at fastdiff's.
            "config_kwargs": {"retries": {"max_attempts": 1}, "read_timeout": 5, "connect_timeout": 5},
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


def _handler(upstream: tuple[str, int], faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            key = unquote(urlsplit(self.path).path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.command == "GET":
                with faults.lock:
                    faults.gets[key] += 1
                    n = faults.gets[key]
                    faults.in_flight += 1
                    faults.max_in_flight = max(faults.max_in_flight, faults.in_flight)
                try:
                    if any(s in key for s in faults.stall):
                        faults.release.wait()
                        self.close_connection = True
                        return
                    if any(s in key and n <= k for s, k in faults.fail_first.items()):
                        payload = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                        self.send_response(500)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                    self._relay(key, body)
                finally:
                    with faults.lock:
                        faults.in_flight -= 1
            else:
                self._relay(key, body)

        def _relay(self, key: str, body: bytes | None) -> None:
            conn = http.client.HTTPConnection(*upstream, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer's length is the object's, as upstream said.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    if self.command == "GET":
                        with faults.lock:
                            faults.bytes_served[key] += len(data)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    return Proxy


@contextmanager
def s3_server() -> Iterator[S3]:
    """Start moto on 127.0.0.1 and the proxy in front of it; stop both (releasing stalled GETs) at exit."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    faults = Faults()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(moto.get_host_and_port(), faults))
    proxy.daemon_threads = True
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield S3(f"http://127.0.0.1:{proxy.server_address[1]}", faults)
    finally:
        faults.release.set()
        proxy.shutdown()
        proxy.server_close()
        moto.stop()
