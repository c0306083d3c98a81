"""A stand-in llama-server for the agent's unit tests: it answers /health, /metrics and /slots, and
answers each completion with the JSON body it received, so a test sees what the agent sent on.

    echo_llama_server.py --port 8080 [any other llama-server flags, ignored]

A completion whose ``grammar`` is ``root ::= "fail"`` gets the 500 that llama-server answers to a
constraint it cannot convert (an exception other than ``invalid_argument``); the prompt ``fail``
gets the same 500 without a constraint, and the prompt ``parser`` the 500 of llama-server's chat
parser failing on the model's output (whatever the constraint).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAIL_GRAMMAR = 'root ::= "fail"'


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int, data: object, ctype: str = "application/json") -> None:
        body = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._answer(200, "", "text/plain; version=0.0.4")
        else:
            self._answer(200, [] if self.path == "/slots" else {"status": "ok"})

    def do_POST(self) -> None:
        received = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if received.get("grammar") == FAIL_GRAMMAR or received.get("prompt") == "fail":
            message = "JSON schema conversion failed:\nstub: no grammar for this"
            self._answer(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
            return
        if received.get("prompt") == "parser":
            message = "The model produced output that does not match the expected peg-native format"
            self._answer(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
            return
        self._answer(200, {"object": "echo", "path": self.path, "received": received})

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    if "--version" in argv:
        print("version: 0 (echo stand-in)")
        return 0
    port = int(argv[argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
