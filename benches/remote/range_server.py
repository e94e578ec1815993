#!/usr/bin/env python3
"""A minimal HTTP/1.1 file server that honours Range (what object storage offers): HEAD gives
the size, GET with `Range: bytes=a-b` a 206 with Content-Range. Keep-alive, one thread per
connection. Used by benches/nbd-vs.sh for the remote rows, behind benches/startup/delay_proxy.py.

Usage: range_server.py HOST:PORT DIR
"""
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _file(self):
        path = os.path.join(ROOT, os.path.basename(self.path))
        return path if os.path.isfile(path) else None

    def do_HEAD(self):
        p = self._file()
        if p is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(p)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        p = self._file()
        if p is None:
            self.send_error(404)
            return
        size = os.path.getsize(p)
        rng = self.headers.get("Range", "")
        if not rng.startswith("bytes="):
            a, b = 0, size - 1
            self.send_response(200)
        else:
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b) if b else size - 1, size - 1)
            if a > b:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
        with open(p, "rb") as f:
            f.seek(a)
            body = f.read(b - a + 1)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    host, port = sys.argv[1].rsplit(":", 1)
    ROOT = sys.argv[2]
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
