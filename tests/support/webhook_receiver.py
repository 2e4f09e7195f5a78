"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 in a thread, whose answer the
test sets (a status, or a sleep longer than the sender's timeout), keeping what it received."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    status: int = 200
    answer: bytes = b'{"ok": true}'
    sleep_seconds: float = 0.0
    received: list[Received] = field(default_factory=list)


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            time.sleep(receiver.sleep_seconds)
            try:
                self.send_response(receiver.status)
                self.send_header("content-length", str(len(receiver.answer)))
                self.end_headers()
                self.wfile.write(receiver.answer)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a sender that gave up waiting (the slow receiver's test)

        def log_message(self, *args):
            pass

    return Handler


@contextmanager
def running_receiver(port: int = 0) -> Iterator[Receiver]:
    receiver = Receiver(url="")
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(receiver))
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_port}/hooks/specialist"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (it was free a moment ago): connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
