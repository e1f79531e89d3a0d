"""A hostile central server for tests: real HTTPS with the central server's certificate and
client certificates required (chained to the site's anchor), but it serves whatever the
test drops into FOLDER/offer — each document once — and records the node's reports in
FOLDER/reports.jsonl. It stands for a compromised server or a man in the middle holding a
valid server certificate: the node must refuse everything not properly signed and new.

usage: hostile_central.py PORT CERT KEY CLIENT_CA FOLDER
"""

import http.server
import os
import ssl
import sys
import time

PORT, CERT, KEY, CLIENT_CA, FOLDER = sys.argv[1:6]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("hostile: " + (fmt % args) + "\n")

    def answer(self, code, body=b"", content_type="application/json"):
        self.send_response(code)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if "/config" not in self.path:
            return self.answer(404)
        offer = os.path.join(FOLDER, "offer")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                with open(offer, "rb") as f:
                    body = f.read()
                os.unlink(offer)
                return self.answer(200, body)
            except FileNotFoundError:
                time.sleep(0.05)
        return self.answer(204)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        with open(os.path.join(FOLDER, "reports.jsonl"), "ab") as f:
            f.write(body.replace(b"\n", b" ") + b"\n")
        return self.answer(200, b'{"recorded": true}')


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.minimum_version = ssl.TLSVersion.TLSv1_3
context.load_cert_chain(CERT, KEY)
context.verify_mode = ssl.CERT_REQUIRED
context.load_verify_locations(CLIENT_CA)
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
