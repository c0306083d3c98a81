"""A stand-in llama-server for the agent's unit tests: it answers /health, /metrics and /slots, and
answers each completion with the JSON body it received (and one choice, which a probe needs), so a
test sees what the agent sent on.

    echo_llama_server.py --port 8080 [any other llama-server flags, ignored]

A completion whose ``grammar`` is ``root ::= "fail"`` gets the 500 that llama-server answers to a
constraint it cannot convert (an exception other than ``invalid_argument``); the prompt ``fail``
gets the same 500 without a constraint, and the prompt ``parser`` the 500 of llama-server's chat
parser failing on the model's output (whatever the constraint).

The stand-in reads its ``--model`` once at start, as llama-server loads it: weights that begin with
``FAIL-PROBE`` get that 500 on every completion (a model that loads but cannot answer), weights
that begin with ``FAIL-START`` make it exit with 1 at once (a model that does not load). Every
completion names the weights it serves (``model``, the path with links resolved).

``/v1/embeddings`` answers one vector of ``EMBEDDING_SIZE`` numbers per input, in OpenAI's
shape, naming the weights too.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAIL_GRAMMAR = 'root ::= "fail"'
EMBEDDING_SIZE = 8
MODEL = ""  # the resolved --model path
BROKEN = False  # the weights begin with FAIL-PROBE


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
        if BROKEN or received.get("grammar") == FAIL_GRAMMAR or received.get("prompt") == "fail":
            message = "JSON schema conversion failed:\nstub: no grammar for this"
            self._answer(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
            return
        if self.path == "/v1/embeddings":
            inputs = received["input"] if isinstance(received["input"], list) else [1]
            vector = [0.1 * (i + 1) for i in range(EMBEDDING_SIZE)]
            data = [{"object": "embedding", "index": i, "embedding": vector}
                    for i in range(len(inputs))]  # fmt: skip
            self._answer(200, {"object": "list", "data": data, "model": MODEL})
            return
        if received.get("prompt") == "parser":
            message = "The model produced output that does not match the expected peg-native format"
            self._answer(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
            return
        choice = {"index": 0, "text": "echo", "finish_reason": "stop"}  # what a probe needs
        self._answer(
            200,
            {"object": "echo", "path": self.path, "model": MODEL, "received": received,
             "choices": [choice]},
        )  # fmt: skip

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    if "--version" in argv:
        print("version: 0 (echo stand-in)")
        return 0
    global MODEL, BROKEN
    port = int(argv[argv.index("--port") + 1])
    if "--model" in argv:
        model = Path(argv[argv.index("--model") + 1]).resolve()
        MODEL = str(model)
        with model.open("rb") as weights:
            head = weights.read(10)
        if head == b"FAIL-START":
            return 1
        BROKEN = head == b"FAIL-PROBE"
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
