"""Score endpoints with an exported router over HTTP, for routers written in other languages.

::

    python -m llm_cluster_env.deploy.serve EXPORT_DIR [--host 127.0.0.1] [--port 8200]

loads ``EXPORT_DIR`` (``train/export.py --out``) with
:class:`~llm_cluster_env.deploy.router_runtime.ExportedRouter` (the folder is checked before
the port opens) and answers, on loopback unless ``--host`` says otherwise (there is no
authentication: keep it on loopback or a private network):

``POST /v1/score``
    body ``{"endpoints": [{"id": "pod-a", "features": {"queued": 2, ...}}, ...],
    "request": {"req/prompt_tokens_k": 1.2, "global/arrival_rate": 13.9}}`` with every
    per-replica feature of ``schema.json`` for each endpoint and every request feature, in
    the schema's units; reply ``{"choice": "pod-b", "choice_index": 1, "endpoints": [{"id":
    "pod-a", "logit": -0.7, "probability": 0.21}, ...]}`` in the order sent. ``logit`` is the
    policy's unnormalised score at temperature 1 (higher is better; only differences between
    endpoints of one call mean anything), ``probability`` its softmax over the endpoints of
    the call (they sum to 1); ``choice`` is the most probable endpoint.
``GET /v1/schema``
    the features with units and valid ranges, the policy kind, the replica count it routes,
    and the limits.
``GET /health``
    ``{"status": "ok", ...}`` once the export is loaded.
``POST /v1/reset``
    forget the recurrent state and decision history (matters for stateful policies only; any body is ignored).

Errors are JSON ``{"error": {"status": 400, "field": "endpoints[1].features.kv_usage",
"message": "..."}}``: 400 for a body that is not JSON or a missing, unknown or invalid field or
feature (the runtime's rules: numbers, finite, >= 0, fractions <= 1, ``speed_k`` > 0), 404 for
an unknown path, 405 for a wrong method (with ``Allow``), 411 without ``Content-Length``, 413
for a body above ``--max-body-bytes``. A stateful policy (LSTM or decision history) advances
its state once per score call, as if the caller routed to ``choice``.

Depends on the standard library (``http.server``), numpy and onnxruntime only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

try:  # inside the package, or copied next to router_runtime.py in an export folder
    from llm_cluster_env.deploy.router_runtime import (
        ExportedRouter,
        ExportFormatError,
        RouterInputError,
    )
except ImportError:  # pragma: no cover - the copied layout
    from router_runtime import (  # type: ignore[no-redef]
        ExportedRouter,
        ExportFormatError,
        RouterInputError,
    )

logger = logging.getLogger(__name__)

API_VERSION = 1
SCORE_PATH = "/v1/score"
SCHEMA_PATH = "/v1/schema"
RESET_PATH = "/v1/reset"
HEALTH_PATH = "/health"
SCORE_MEANING = {
    "logit": "the policy's unnormalised score of the endpoint at temperature 1; higher is "
             "better; only differences between endpoints of one call are meaningful",
    "probability": "softmax of the logits over the endpoints of the call (they sum to 1); "
                   "choice is the endpoint with the highest",
}


@dataclass(frozen=True)
class ServeConfig:
    """How the scoring service listens.

    :param export_dir: the export folder (``schema.json``, ``policy.onnx``).
    :param host: address to bind; loopback by default (the service has no authentication).
    :param port: TCP port; 0 picks a free one.
    :param max_body_bytes: largest request body accepted (bytes); larger ones get 413.
    :param read_timeout_s: a connection idle or stalled this long (seconds) is closed.
    :param onnx_threads: onnxruntime intra- and inter-op threads.
    """

    export_dir: Path
    host: str = "127.0.0.1"
    port: int = 8200
    max_body_bytes: int = 1 << 20
    read_timeout_s: float = 10.0
    onnx_threads: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: must be in [0, 65535]")
        if self.max_body_bytes < 64:
            raise ValueError(f"max_body_bytes={self.max_body_bytes}: must be >= 64")
        if not (self.read_timeout_s > 0 and math.isfinite(self.read_timeout_s)):
            raise ValueError(f"read_timeout_s={self.read_timeout_s}: must be finite and > 0")
        if self.onnx_threads < 1:
            raise ValueError(f"onnx_threads={self.onnx_threads}: must be >= 1")


class ScoreRequestError(ValueError):
    """A request the service refuses: the HTTP status, the offending field (a path into the
    JSON body, or a header) and the reason."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field

    def payload(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": str(self)}}


def _field_of(err: RouterInputError) -> str:
    """The body path a runtime error is about."""
    if err.part == "request":
        return f"request.{err.feature}" if err.feature else "request"
    if err.replica is not None:
        return (f"endpoints[{err.replica}].features.{err.feature}" if err.feature
                else f"endpoints[{err.replica}]")
    return "endpoints"


class ScoringService:
    """The service without HTTP: validates a parsed body, scores it, describes the export.

    :param router: the loaded export (one lock serialises its use: a stateful policy's state
        advances once per call, and onnxruntime gets one call at a time).
    :param max_body_bytes: the body limit it reports in :meth:`describe`.
    """

    def __init__(self, router: ExportedRouter, *, max_body_bytes: int = 1 << 20) -> None:
        self.router = router
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self.scored = 0

    def score(self, body: Any) -> dict[str, Any]:
        """Scores and choice for a parsed ``/v1/score`` body (see the module docs);
        :class:`ScoreRequestError` (400) naming the field otherwise."""
        ids, features, request = self._parse(body)
        try:
            with self._lock:
                decision = self.router.decide(features, request, ids=ids)
                self.scored += 1
        except RouterInputError as err:
            raise ScoreRequestError(400, _field_of(err), str(err)) from None
        logits = decision.logits.tolist()
        probabilities = decision.probabilities.tolist()
        return {"choice": ids[decision.replica], "choice_index": decision.replica,
                "endpoints": [{"id": i, "logit": lg, "probability": p}
                              for i, lg, p in zip(ids, logits, probabilities)]}

    @staticmethod
    def _parse(body: Any) -> tuple[list[str], list[Mapping[str, Any]], Mapping[str, Any]]:
        if not isinstance(body, dict):
            raise ScoreRequestError(400, "body", f"body: a JSON {_json_type(body)}, expected an "
                                                 "object with 'endpoints' and 'request'")
        unknown = sorted(set(body) - {"endpoints", "request"})
        if unknown:
            raise ScoreRequestError(400, unknown[0], f"unknown field(s) {unknown} (expected "
                                                     "'endpoints' and 'request')")
        for key in ("endpoints", "request"):
            if key not in body:
                raise ScoreRequestError(400, key, f"{key}: missing")
        endpoints, request = body["endpoints"], body["request"]
        if not isinstance(endpoints, list) or not endpoints:
            raise ScoreRequestError(400, "endpoints", f"endpoints: a JSON "
                                    f"{_json_type(endpoints)}"
                                    f"{' (empty)' if endpoints == [] else ''}, expected a "
                                    "non-empty array of {\"id\", \"features\"} objects")
        if not isinstance(request, dict):
            raise ScoreRequestError(400, "request", f"request: a JSON {_json_type(request)}, "
                                                    "expected an object feature -> number")
        ids: list[str] = []
        features: list[Mapping[str, Any]] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(endpoints):
            where = f"endpoints[{i}]"
            if not isinstance(entry, dict):
                raise ScoreRequestError(400, where, f"{where}: a JSON {_json_type(entry)}, "
                                                    "expected {\"id\", \"features\"}")
            extra = sorted(set(entry) - {"id", "features"})
            if extra:
                raise ScoreRequestError(400, f"{where}.{extra[0]}", f"{where}: unknown "
                                        f"field(s) {extra} (expected 'id' and 'features')")
            endpoint_id = entry.get("id")
            if not isinstance(endpoint_id, str) or not endpoint_id:
                raise ScoreRequestError(400, f"{where}.id", f"{where}.id={endpoint_id!r}: "
                                                            "expected a non-empty string")
            if endpoint_id in seen:
                raise ScoreRequestError(400, f"{where}.id", f"{where}.id={endpoint_id!r}: "
                                        f"also the id of endpoints[{seen[endpoint_id]}]")
            seen[endpoint_id] = i
            stats = entry.get("features")
            if not isinstance(stats, dict):
                raise ScoreRequestError(400, f"{where}.features", f"{where}.features: a JSON "
                                        f"{_json_type(stats)}, expected an object feature -> "
                                        "number")
            ids.append(endpoint_id)
            features.append(stats)
        return ids, features, request

    def reset(self) -> dict[str, Any]:
        with self._lock:
            self.router.reset()
        return {"status": "reset", "stateful": self.router.stateful}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "api_version": API_VERSION, "policy": self.router.kind,
                "stateful": self.router.stateful, "scored": self.scored}

    def describe(self) -> dict[str, Any]:
        """The ``/v1/schema`` reply: what to send and what comes back."""
        router, ranges = self.router, self.router.value_ranges()
        schema = router.schema

        def entries(key: str) -> list[dict[str, Any]]:
            return [{"name": e["name"], "unit": e.get("unit"), "range": ranges[e["name"]],
                     "source": e.get("source"), "vllm_metric": e.get("vllm_metric")}
                    for e in schema[key]]

        return {
            "api_version": API_VERSION,
            "policy": {"kind": router.kind, "recurrent": router.recurrent,
                       "stateful": router.stateful,
                       "replica_count": router.fixed_replicas or "any",
                       "replica_count_text": schema["replica_count"].get("text")},
            "replica_features": entries("replica_features"),
            "request_features": entries("request_features"),
            "scores": SCORE_MEANING,
            "limits": {"max_body_bytes": self.max_body_bytes},
            "onnx_sha256": schema.get("onnx", {}).get("sha256"),
            "provenance": {k: v for k, v in schema.get("provenance", {}).items()
                           if k in ("label", "source", "created_utc")},
        }


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (send finite numbers)")


def parse_json(body: bytes) -> Any:
    """The body as JSON (UTF-8, standard JSON only: no ``NaN``/``Infinity``)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise ScoreRequestError(400, "body", f"body: not UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ScoreRequestError(400, "body", f"body: not valid JSON (line {err.lineno}, "
                                             f"column {err.colno}: {err.msg})") from None
    except ValueError as err:
        raise ScoreRequestError(400, "body", f"body: not valid JSON ({err})") from None
    except RecursionError:
        raise ScoreRequestError(400, "body", "body: JSON nested too deeply") from None


class _Handler(BaseHTTPRequestHandler):
    """Routes ``/v1/score``, ``/v1/schema``, ``/v1/reset`` and ``/health``; everything JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "llm-cluster-router-score/1"
    disable_nagle_algorithm = True
    server: ScoreServer

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout_s
        super().setup()

    # ------------------------------------------------------------------ dispatch
    def _routes(self) -> dict[str, dict[str, Any]]:
        service = self.server.service
        return {  # POST handlers take the body (read first, within the limits)
            SCORE_PATH: {"POST": lambda body: service.score(parse_json(body))},
            RESET_PATH: {"POST": lambda body: service.reset()},
            SCHEMA_PATH: {"GET": service.describe},
            HEALTH_PATH: {"GET": service.health},
        }

    def _dispatch(self) -> None:
        started = time.perf_counter()
        status = 200
        self._body_read = False
        try:
            path = urlsplit(self.path).path
            methods = self._routes().get(path)
            if methods is None:
                raise ScoreRequestError(404, "path", f"{path}: no such endpoint (known: "
                                        f"{sorted(self._routes())})")
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                self._allow = ", ".join(sorted(methods))
                raise ScoreRequestError(405, "method", f"{self.command} {path}: not allowed "
                                                       f"(use {self._allow})")
            payload = methods[method](self._body()) if method == "POST" else methods[method]()
        except ScoreRequestError as err:
            status, payload = err.status, err.payload()
            if not self._body_read and (self.headers.get("Transfer-Encoding") or
                                        self.headers.get("Content-Length", "0") != "0"):
                self.close_connection = True  # its unread body would read as the next request
        except Exception:  # a bug, not the client's fault: log it, answer 500
            logger.exception("scoring service: %s %s failed", self.command, self.path)
            status = 500
            payload = {"error": {"status": 500, "field": None,
                                 "message": "internal error (see the service's log)"}}
        self._send(status, payload)
        logger.debug("%s %s -> %d in %.3f ms", self.command, self.path, status,
                     1e3 * (time.perf_counter() - started))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    # ------------------------------------------------------------------ body and reply
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ScoreRequestError(411, "Transfer-Encoding", "Transfer-Encoding: not "
                                    "accepted; send the body with a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ScoreRequestError(411, "Content-Length", "Content-Length: missing (a body "
                                    "with a Content-Length is required)")
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ScoreRequestError(400, "Content-Length", f"Content-Length={length!r}: not a "
                                    "byte count") from None
        limit = self.server.config.max_body_bytes
        if size > limit:  # refuse unread, and close: the rest of the stream is that body
            self.close_connection = True
            raise ScoreRequestError(413, "body", f"body: {size} bytes, the limit is {limit} "
                                                 "(--max-body-bytes)")
        try:
            body = self.rfile.read(size)
        except OSError:  # the read timeout included
            self.close_connection = True
            raise ScoreRequestError(408, "body", f"body: not received within "
                                    f"{self.server.config.read_timeout_s} s "
                                    "(--read-timeout)") from None
        self._body_read = True
        if len(body) != size:
            self.close_connection = True
            raise ScoreRequestError(400, "body", f"body: {len(body)} of the {size} bytes "
                                                 "Content-Length announced")
        return body

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        """One write: status line, headers and body (no Nagle/delayed-ACK stall)."""
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except ValueError:  # a NaN score: never send invalid JSON
            logger.error("scoring service: a non-finite value in the reply to %s %s",
                         self.command, self.path)
            status = 500
            body = json.dumps({"error": {"status": 500, "field": None, "message": "the "
                               "policy returned a non-finite score"}}).encode()
        phrase = HTTPStatus(status).phrase
        head = [f"HTTP/1.1 {status} {phrase}", f"Server: {self.server_version}",
                f"Date: {self.date_time_string()}", "Content-Type: application/json",
                f"Content-Length: {len(body)}"]
        if status == 405:
            head.append(f"Allow: {self._allow}")
        if self.close_connection or status >= 500:
            self.close_connection = True
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if getattr(self, "command", None) != "HEAD":
            data += body
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors http.server detects itself (a malformed request line, oversized headers), as
        JSON."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self._allow = "GET, POST"
        self._send(code, {"error": {"status": code, "field": "request line or headers",
                                    "message": text}})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        logger.debug("%s - " + format, self.address_string(), *args)


class ScoreServer(ThreadingHTTPServer):
    """A threading HTTP server (one thread per connection, daemon threads) holding the
    service and its config."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, config: ServeConfig, service: ScoringService) -> None:
        self.config = config
        self.service = service
        super().__init__((config.host, config.port), _Handler)


def make_server(config: ServeConfig, router: ExportedRouter | None = None) -> ScoreServer:
    """A bound (not yet serving) server for ``config``: call ``serve_forever()``, and
    ``shutdown()`` plus ``server_close()`` to stop. ``router`` defaults to
    ``ExportedRouter.load(config.export_dir)``."""
    if router is None:
        router = ExportedRouter.load(config.export_dir, num_threads=config.onnx_threads)
    service = ScoringService(router, max_body_bytes=config.max_body_bytes)
    return ScoreServer(config, service)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_OPTIONS = {"port": "--port", "max_body_bytes": "--max-body-bytes",
            "read_timeout_s": "--read-timeout", "onnx_threads": "--onnx-threads"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llm_cluster_env.deploy.serve",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ServeConfig(Path("."))
    p.add_argument("export_dir", metavar="EXPORT_DIR", type=Path,
                   help="export folder of train/export.py (schema.json, policy.onnx)")
    p.add_argument("--host", default=defaults.host,
                   help="address to bind (default %(default)s; no authentication: keep it on "
                        "loopback or a private network)")
    p.add_argument("--port", type=int, default=defaults.port,
                   help="TCP port, 0 for any free one (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                   help="largest request body accepted, bytes (default %(default)s)")
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s,
                   help="close a connection idle or stalled this long, seconds "
                        "(default %(default)s)")
    p.add_argument("--onnx-threads", type=int, default=defaults.onnx_threads,
                   help="onnxruntime threads (default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until interrupted; exit status 2 when the arguments or the export are bad."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = ServeConfig(args.export_dir, host=args.host, port=args.port,
                             max_body_bytes=args.max_body_bytes,
                             read_timeout_s=args.read_timeout, onnx_threads=args.onnx_threads)
    except ValueError as err:  # ServeConfig names its field: say the option instead
        field = str(err).split("=", 1)[0]
        parser.error(str(err).replace(field, _OPTIONS.get(field, field), 1))
    try:
        server = make_server(config)
    except ExportFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot listen on {config.host}:{config.port}: {err.strerror}",
              file=sys.stderr)
        return 2
    if not _is_loopback(config.host):
        logger.warning("listening on %s: not loopback, and the service has no "
                       "authentication", config.host)
    host, port = server.server_address[:2]
    router = server.service.router
    print(f"scoring with {config.export_dir} ({router.kind} policy, "
          f"{len(router.replica_features)} per-endpoint features) on http://{host}:{port}"
          f"{SCORE_PATH}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
