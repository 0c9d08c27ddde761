"""A small OpenAI-compatible stand-in for `vllm serve`, for the tests of command-template
backends (vLLM itself needs a GPU).

    python tests/standin_openai.py serve MODEL_DIR --served-model-name NAME --host H --port P
        [--gpu-memory-utilization F] [--exit-after SECONDS] [anything else vLLM takes]

Answers `GET /health`, `GET /v1/models` (the served name), `POST /v1/completions` (echoes the
prompt back as the text) and `GET /argv`: the arguments it was started with and the
CUDA_VISIBLE_DEVICES it got, so a test can check the command line gswarm built. It refuses to
start (exit 2) unless MODEL_DIR is a directory, as vLLM would. `--exit-after` makes it die (exit 1)
that long after it started, for tests of a server that keeps dying.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main() -> None:
    """Parse vLLM's command line, then serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--exit-after", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    if not os.path.isdir(args.model):
        print(f"no model directory {args.model}", flush=True)
        sys.exit(2)
    name = args.served_model_name or args.model
    print(f"standin: serving {args.model} as {name} on {args.host}:{args.port}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            elif self.path == "/argv":
                env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
                self._send(200, {"argv": sys.argv[1:], "env": env})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFound"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFound"}})
                return
            text = str(body.get("prompt", ""))
            self._send(
                200,
                {
                    "id": "cmpl-standin",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                },
            )

        def log_message(self, format: str, *args: Any) -> None:
            print(format % args, flush=True)

    if args.exit_after > 0:
        threading.Timer(args.exit_after, os._exit, (1,)).start()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
