"""A stand-in vLLM OpenAI server on 127.0.0.1 for router tests (standard library only).

It serves what production-stack's router reads from an engine:

* ``GET /metrics``: the vLLM V1 gauges ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (not the old
  ``vllm:gpu_cache_usage_perc``). Their values change at every scrape, deterministically
  (scrape ``k``: ``running + k % 3``, ``waiting + k % 2``, ``kv + 0.01 * (k % 5)``), and every
  triple served is appended to the ``--log`` file, so a test can check that what a router saw
  was served;
* ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions``, streamed
  (server-sent events, one ``data:`` event per token) or not, ``max_tokens`` tokens (at most
  ``--max-tokens``). Each request's ``X-Request-Id`` is logged.

``--metrics-status 503`` makes the scrape fail (an endpoint the router never has stats for);
``--drop-every N`` closes the connection without an answer on every N-th completion request
(the router's failover re-routes it). The server stops by itself after ``--lifetime-s``.

    python deploy/production_stack/standin_vllm.py --port 18101 --model m \\
        --running 3 --waiting 1 --kv 0.42 --log runs/standin-18101.jsonl
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import MISSING, dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Args:
    """Command-line arguments."""

    port: int
    """TCP port on 127.0.0.1."""
    model: str = "m"
    """The model name served."""
    running: int = 0
    """Base value of vllm:num_requests_running."""
    waiting: int = 0
    """Base value of vllm:num_requests_waiting."""
    kv: float = 0.0
    """Base value of vllm:kv_cache_usage_perc (a fraction)."""
    log: str | None = None
    """JSONL file: one line per scrape (the gauges served) and per completion request."""
    metrics_status: int = 200
    """HTTP status of /metrics (not 200: the scrape fails)."""
    drop_every: int = 0
    """Close the connection unanswered on every N-th completion request (0: never)."""
    max_tokens: int = 8
    """Most tokens generated per request."""
    token_delay_s: float = 0.002
    """Delay between streamed tokens, seconds."""
    lifetime_s: float = 600.0
    """The server exits after this many seconds."""


class StandIn:
    """The server's state: scrape and request counters, the log."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.scrapes = 0
        self.requests = 0
        self.log = open(args.log, "a", encoding="utf-8", buffering=1) if args.log else None  # noqa: SIM115

    def write(self, record: dict) -> None:
        if self.log is not None:
            with self.lock:
                self.log.write(json.dumps(record) + "\n")

    def gauges(self) -> tuple[int, int, float]:
        with self.lock:
            k = self.scrapes
            self.scrapes += 1
        a = self.args
        return a.running + k % 3, a.waiting + k % 2, round(a.kv + 0.01 * (k % 5), 6)

    def next_request(self) -> int:
        with self.lock:
            self.requests += 1
            return self.requests


def make_handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    args = state.args

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: object) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/metrics"):
                if args.metrics_status != 200:
                    self._send(args.metrics_status, b"no metrics\n", "text/plain")
                    return
                running, waiting, kv = state.gauges()
                state.write({"event": "scrape", "running": running, "waiting": waiting,
                             "kv": kv})
                label = f'{{model_name="{args.model}",engine="0"}}'
                text = "".join(
                    f"# HELP {name} {name}\n# TYPE {name} gauge\n{name}{label} {value}\n"
                    for name, value in (("vllm:num_requests_running", running),
                                        ("vllm:num_requests_waiting", waiting),
                                        ("vllm:kv_cache_usage_perc", kv)))
                self._send(200, text.encode(), "text/plain; version=0.0.4")
            elif self.path.startswith("/v1/models"):
                body = {"object": "list", "data": [{"id": args.model, "object": "model",
                                                    "created": 0, "owned_by": "vllm",
                                                    "root": args.model, "parent": None}]}
                self._send(200, json.dumps(body).encode(), "application/json")
            elif self.path.startswith("/health"):
                self._send(200, b"", "text/plain")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            chat = self.path.startswith("/v1/chat/completions")
            if not (chat or self.path.startswith("/v1/completions")):
                self._send(404, b'{"error": "not found"}', "application/json")
                return
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self._send(400, b'{"error": "body is not JSON"}', "application/json")
                return
            n = state.next_request()
            request_id = self.headers.get("X-Request-Id")
            dropped = bool(args.drop_every and n % args.drop_every == 0)
            state.write({"event": "request", "request_id": request_id, "path": self.path,
                         "stream": bool(body.get("stream")), "dropped": dropped})
            if dropped:
                self.close_connection = True
                return
            tokens = max(1, min(int(body.get("max_tokens") or args.max_tokens),
                                args.max_tokens))
            kind = "chat.completion" if chat else "text_completion"
            if not body.get("stream"):
                text = " ".join(["tok"] * tokens)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "length"} if chat else
                          {"index": 0, "text": text, "finish_reason": "length"})
                answer = {"id": request_id, "object": kind, "model": args.model,
                          "choices": [choice], "usage": {"prompt_tokens": 1,
                                                         "completion_tokens": tokens,
                                                         "total_tokens": tokens + 1}}
                self._send(200, json.dumps(answer).encode(), "application/json")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(tokens + 1):
                if i < tokens:
                    delta = ({"index": 0, "delta": {"content": "tok "}} if chat else
                             {"index": 0, "text": "tok "})
                    event = {"id": request_id, "object": f"{kind}.chunk",
                             "model": args.model, "choices": [delta]}
                    data = f"data: {json.dumps(event)}\n\n".encode()
                else:
                    data = b"data: [DONE]\n\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
                time.sleep(args.token_delay_s)
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    types = {"int": int, "float": float, "str": str, "str | None": str}
    for spec in fields(Args):
        flag = "--" + spec.name.replace("_", "-")
        if spec.default is MISSING:
            parser.add_argument(flag, type=types[spec.type], required=True)
        else:
            parser.add_argument(flag, type=types[spec.type], default=spec.default)
    return Args(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    state = StandIn(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state))
    server.daemon_threads = True
    timer = threading.Timer(args.lifetime_s, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
