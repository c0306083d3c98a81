#!/usr/bin/python3
"""A stand-in pi-agent for the gateway's scenarios: agent_stub.py PORT NAME TOKEN_FILE [TLS_PREFIX].

GET /readyz answers 200 to the service token only (401 otherwise), as the agent does; GET /v1/models
and POST /v1/chat/completions answer with the stub's name and the Authorization header it received,
so that a scenario can see which board served a request and with which token. When TLS_PREFIX.pem
and TLS_PREFIX.key exist, it serves HTTPS with them.
"""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main(argv: list[str]) -> int:
    port, name, token_file = int(argv[1]), argv[2], Path(argv[3])
    expected = "Bearer " + token_file.read_text().strip()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def answer(self, body: bytes = b"") -> None:
            authorization = self.headers.get("Authorization", "")
            if self.path == "/readyz":
                ok = authorization == expected
                self.reply(200 if ok else 401, {"ready": ok})
            elif self.path in ("/v1/models", "/v1/chat/completions"):
                self.reply(200, {"server": name, "authorization": authorization, "body": len(body)})
            else:
                self.reply(404, {"error": {"message": f"no such endpoint: {self.path}"}})

        def do_GET(self) -> None:
            self.answer()

        def do_POST(self) -> None:
            self.answer(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{name}: {format % args}\n")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    tls = Path(argv[4]) if len(argv) > 4 else None
    if tls and tls.with_suffix(".pem").exists():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.with_suffix(".pem"), tls.with_suffix(".key"))
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
