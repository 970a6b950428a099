"""A local HTTP server that records the JSON bodies POSTed to it, and answers as told."""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def recording_server(
    status: int = 200, delay_s: float = 0.0, hold_running: threading.Event | None = None
) -> Iterator[tuple[str, list[dict]]]:
    """Yields the URL to POST to and the list the bodies land in; each POST is answered with
    ``status`` after ``delay_s`` seconds. With ``hold_running``, a ``running`` status is
    answered only once that event is set."""
    received: list[dict] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            received.append(body)
            if hold_running is not None and body.get("status") == "running":
                hold_running.wait()
            time.sleep(delay_s)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/status", received
    finally:
        server.shutdown()
