"""An agent killed in the middle of answering: its server process is SIGKILLed right after its
first write of a response to the socket. The client must get the whole answer (then the closed
connection), never the headers without their body: a gateway cannot retry a response it has
begun to forward (seen once in 6,735 requests through HAProxy, before head and body went out in
one write)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# A real Server on loopback whose process dies right after the first write of any response.
SERVER = r"""
import asyncio, os, signal, sys
from pi_agent.http import Response, Server

write = asyncio.StreamWriter.write

def write_then_die(self, data):
    write(self, data)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.StreamWriter.write = write_then_die

async def handler(request):
    return Response.json({"answer": "x" * 600})

async def main():
    port = await Server(handler).start("127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_server_killed_after_its_first_write_has_sent_the_whole_response() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()  # IncompleteRead when the body never left
        assert response.status == 200
        assert json.loads(body) == {"answer": "x" * 600}
        deadline = time.monotonic() + 30
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.returncode == -9  # it did die right after that one write
    finally:
        server.kill()
        server.wait()
