"""A static HTTP server on 127.0.0.1 for the remote-data tests and benchmark (`python -m http.server`-like).

It serves one directory, counts the requests (a test reads how often a shard was fetched), and
bounds each request with a socket timeout; it listens on the loopback interface only.
"""

from __future__ import annotations

import collections
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    timeout = 30  # seconds a request may stall before its connection is dropped

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        self.server.requests[self.command + " " + self.path] += 1


class StaticServer:
    """`with StaticServer(directory) as url:` serves `directory` at `url` (http://127.0.0.1:PORT)."""

    def __init__(self, directory: Path):
        handler = functools.partial(_Handler, directory=str(directory))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.requests = collections.Counter()
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> collections.Counter:
        return self.httpd.requests

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
