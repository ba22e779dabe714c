"""The HTTP scoring service, through a real HTTP client against a server on an ephemeral
loopback port. The export's policy scores replica i by ``-(queued_i + running_i)`` (``lor``,
:func:`test_router_runtime.write_export`), so every score is known in advance."""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_router_runtime import write_export  # noqa: E402

from llm_cluster_env.deploy.serve import ServeConfig, main, make_server  # noqa: E402

TIMEOUT_S = 10.0
REQUEST = {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("serve") / "lor")


class Running:
    """A server in a background thread; stopped by :meth:`stop`."""

    def __init__(self, config: ServeConfig) -> None:
        self.server = make_server(config)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=TIMEOUT_S)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def served(export_dir):
    running = Running(ServeConfig(export_dir, port=0, max_body_bytes=4096,
                                  read_timeout_s=1.0))
    yield running
    running.stop()


def call(port: int, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """``(status, headers, parsed JSON or None)`` of one request."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        return response.status, dict(response.getheaders()), json.loads(raw) if raw else None
    finally:
        if own:
            conn.close()


def endpoint_features(queued: float, running: float, **extra) -> dict:
    features = {"queued": queued, "running": running, "kv_usage": 0.4,
                "prefill_tokens_k": 0.2, "decode_tokens_k": 1.5, "dispatch_share": 0.25,
                "speed_k": 1.43, "kv_capacity_k": 117.6, "est_wait_s": 0.1,
                "est_ttft_s": 0.2, "est_delta_s": 4.0}
    features.update(extra)
    return features


def score_body(**changes) -> dict:
    endpoints = [{"id": "pod-a", "features": endpoint_features(3, 4)},
                 {"id": "pod-b", "features": endpoint_features(0, 2)},
                 {"id": "pod-c", "features": endpoint_features(1, 5)}]
    return {"endpoints": endpoints, "request": dict(REQUEST), **changes}


# --------------------------------------------------------------------------- scoring
def test_score_returns_the_policys_logits_probabilities_and_choice(served):
    status, headers, reply = call(served.port, "POST", "/v1/score", score_body())
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert reply["choice"] == "pod-b" and reply["choice_index"] == 1
    assert [e["id"] for e in reply["endpoints"]] == ["pod-a", "pod-b", "pod-c"]
    assert [e["logit"] for e in reply["endpoints"]] == [-7.0, -2.0, -6.0]
    norm = sum(math.exp(x) for x in (-7.0, -2.0, -6.0))
    for entry, logit in zip(reply["endpoints"], (-7.0, -2.0, -6.0)):
        assert entry["probability"] == pytest.approx(math.exp(logit) / norm, rel=1e-5)


def test_one_keep_alive_connection_serves_a_bounded_run_of_requests(served):
    _, _, before = call(served.port, "GET", "/health")
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT_S)
    try:
        for k in range(20):
            body = score_body()
            idle = k % 2 == 1
            body["endpoints"][2]["features"].update(queued=0.0 if idle else 9.0,
                                                    running=0.0 if idle else 5.0)
            status, _, reply = call(served.port, "POST", "/v1/score", body, conn=conn)
            assert status == 200
            assert reply["choice"] == ("pod-c" if idle else "pod-b")
            assert reply["endpoints"][2]["logit"] == (0.0 if idle else -14.0)
    finally:
        conn.close()
    _, _, after = call(served.port, "GET", "/health")
    assert after["scored"] - before["scored"] == 20


def test_concurrent_clients_all_get_their_own_scores(served):
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        body = score_body()
        body["endpoints"][0]["features"]["queued"] = float(k)
        for _ in range(5):
            status, _, reply = call(served.port, "POST", "/v1/score", body)
            with lock:
                results.append((status, k, reply["endpoints"][0]["logit"]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT_S)
    assert sorted(results) == sorted((200, k, -(k + 4.0)) for k in range(4) for _ in range(5))


def test_health_and_schema_describe_the_export(served):
    status, _, health = call(served.port, "GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["policy"] == "replica_set"
    assert health["stateful"] is False
    status, _, schema = call(served.port, "GET", "/v1/schema")
    assert status == 200
    names = [f["name"] for f in schema["replica_features"]]
    assert names == list(endpoint_features(0, 0))
    ranges = {f["name"]: f["range"] for f in schema["replica_features"]}
    assert ranges["kv_usage"] == "[0, 1]" and ranges["speed_k"] == "(0, inf)"
    assert ranges["est_delta_s"] == "(-inf, inf)" and ranges["queued"] == "[0, inf)"
    assert [f["name"] for f in schema["request_features"]] == list(REQUEST)
    assert schema["policy"]["replica_count"] == "any"
    assert schema["limits"]["max_body_bytes"] == 4096
    assert set(schema["scores"]) == {"logit", "probability"}
    assert len(schema["onnx_sha256"]) == 64


def test_head_health_has_headers_and_no_body(served):
    status, headers, reply = call(served.port, "HEAD", "/health")
    assert status == 200 and reply is None and int(headers["Content-Length"]) > 0


# --------------------------------------------------------------------------- refusals
def _set(path: str, value):
    """A body edit: ``endpoints.1.features.kv_usage`` -> value (``del`` deletes it)."""
    def edit(body):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = body
        for key in keys[:-1]:
            node = node[key]
        if value == "del":
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        return body
    return edit


@pytest.mark.parametrize("edit, field, message", [
    (_set("endpoints.1.features.kv_usage", 5.0), "endpoints[1].features.kv_usage",
     r"replica 1 \(endpoint 'pod-b'\): kv_usage=5.0: must be finite and >= 0 and <= 1"),
    (_set("endpoints.0.features.running", "4"), "endpoints[0].features.running",
     r"replica 0 \(endpoint 'pod-a'\): feature 'running'='4': not a number"),
    (_set("endpoints.2.features.queued", True), "endpoints[2].features.queued",
     r"feature 'queued'=True: not a number \(a bool"),
    (_set("endpoints.2.features.queued", None), "endpoints[2].features.queued",
     "feature 'queued'=None: not a number"),
    (_set("endpoints.0.features.queued", -1), "endpoints[0].features.queued",
     r"queued=-1.0: must be finite and >= 0"),
    (_set("endpoints.2.features.speed_k", 0), "endpoints[2].features.speed_k",
     "speed_k=0.0: must be > 0"),
    (_set("endpoints.2.features.est_wait_s", "del"), "endpoints[2].features.est_wait_s",
     r"missing feature\(s\) \['est_wait_s'\]"),
    (_set("endpoints.1.features.prefix_hit", 0.5), "endpoints[1].features.prefix_hit",
     r"unknown feature\(s\) \['prefix_hit'\]"),
    (_set("request.global/arrival_rate", -2), "request.global/arrival_rate",
     "request: global/arrival_rate=-2.0: must be finite and >= 0"),
    (_set("request.req/prompt_tokens_k", "del"), "request.req/prompt_tokens_k",
     r"request: missing feature\(s\) \['req/prompt_tokens_k'\]"),
    (_set("request", [1, 2]), "request", "request: a JSON array, expected an object"),
    (_set("endpoints", []), "endpoints", r"endpoints: a JSON array \(empty\), expected a "
                                         "non-empty array"),
    (_set("endpoints.1", "pod-b"), "endpoints[1]", r"endpoints\[1\]: a JSON string"),
    (_set("endpoints.1.id", "pod-a"), "endpoints[1].id",
     r"endpoints\[1\].id='pod-a': also the id of endpoints\[0\]"),
    (_set("endpoints.1.id", 7), "endpoints[1].id",
     r"endpoints\[1\].id=7: expected a non-empty string"),
    (_set("endpoints.1.weight", 2), "endpoints[1].weight", r"unknown field\(s\) \['weight'\]"),
    (_set("endpoints.0.features", [1.0]), "endpoints[0].features",
     r"endpoints\[0\]\.features: a JSON array"),
    (_set("request", "del"), "request", "request: missing"),
    (_set("model", "llama"), "model", r"unknown field\(s\) \['model'\]"),
])
def test_invalid_bodies_get_400_naming_the_field(served, edit, field, message):
    status, headers, reply = call(served.port, "POST", "/v1/score", edit(score_body()))
    assert status == 400, reply
    assert reply["error"]["status"] == 400 and reply["error"]["field"] == field
    assert re.search(message, reply["error"]["message"]), reply
    assert "Connection" not in headers  # the body was read: the connection stays usable


@pytest.mark.parametrize("body, message", [
    (b"{\"endpoints\": [", r"body: not valid JSON \(line 1, column 16: Expecting value\)"),
    (b"", r"body: not valid JSON \(line 1, column 1: Expecting value\)"),
    (b'{"endpoints": [{"id": "a", "features": {"queued": NaN}}], "request": {}}',
     r"body: not valid JSON \(NaN is not JSON"),
    (b"\xff\xfe", r"body: not UTF-8 \(byte 0\)"),
    (b"[" * 2000 + b"]" * 2000, "body: JSON nested too deeply"),
    (b"[1, 2]", "body: a JSON array, expected an object"),
])
def test_a_body_that_is_not_a_json_object_gets_400(served, body, message):
    status, _, reply = call(served.port, "POST", "/v1/score", body)
    assert status == 400
    assert reply["error"]["field"] == "body"
    assert re.match(message, reply["error"]["message"]), reply


def test_unknown_paths_get_404_and_wrong_methods_405_with_allow(served):
    status, _, reply = call(served.port, "GET", "/v1/scores")
    assert status == 404 and reply["error"]["field"] == "path"
    assert "/v1/scores: no such endpoint" in reply["error"]["message"]
    status, headers, reply = call(served.port, "POST", "/nope", score_body())
    assert status == 404
    status, headers, reply = call(served.port, "GET", "/v1/score")
    assert status == 405 and headers["Allow"] == "POST"
    assert reply["error"]["message"] == "GET /v1/score: not allowed (use POST)"
    status, headers, _ = call(served.port, "DELETE", "/health")
    assert status == 405 and headers["Allow"] == "GET"


def test_a_refused_request_with_an_unread_body_closes_the_connection(served):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT_S)
    try:
        status, headers, _ = call(served.port, "PUT", "/v1/score", score_body(), conn=conn)
        assert status == 405 and headers["Connection"] == "close"
    finally:
        conn.close()


def test_a_body_above_the_limit_gets_413_unread(served):
    body = score_body()
    body["endpoints"][0]["id"] = "x" * 5000
    status, headers, reply = call(served.port, "POST", "/v1/score", body)
    assert status == 413 and headers["Connection"] == "close"
    size = len(json.dumps(body).encode())
    assert reply["error"] == {"status": 413, "field": "body", "message": f"body: {size} bytes, "
                              "the limit is 4096 (--max-body-bytes)"}
    assert call(served.port, "GET", "/health")[0] == 200  # the server goes on


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh socket and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        chunks = []
        for _ in range(1000):  # bounded: the server closes after its reply
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _reply(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("request_head, status, field", [
    (b"POST /v1/score HTTP/1.1\r\nHost: x\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     411, "Transfer-Encoding"),
    (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400,
     "Content-Length"),
    (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"endpoints\"", 408,
     "body"),
    (b"GARBAGE\r\n\r\n", 400, "request line or headers"),
])
def test_requests_without_a_usable_body_length_are_refused_and_closed(served, request_head,
                                                                      status, field):
    code, reply = _reply(raw_exchange(served.port, request_head))
    assert code == status and reply["error"]["field"] == field


# --------------------------------------------------------------------------- other exports
def test_a_flat_policy_scores_exactly_its_replica_count(tmp_path):
    running = Running(ServeConfig(write_export(tmp_path / "flat", fixed=2, history_window=1),
                                  port=0))
    try:
        _, _, health = call(running.port, "GET", "/health")
        assert health["policy"] == "flat" and health["stateful"] is True
        body = score_body()
        status, _, reply = call(running.port, "POST", "/v1/score", body)
        assert status == 400 and reply["error"]["field"] == "endpoints"
        assert "3 given, this (flat) policy routes exactly 2" in reply["error"]["message"]
        body["endpoints"] = body["endpoints"][:2]
        status, _, reply = call(running.port, "POST", "/v1/score", body)
        assert status == 200 and reply["choice"] == "pod-b"
        assert [e["logit"] for e in reply["endpoints"]] == [-7.0, -2.0]
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=TIMEOUT_S)
        try:  # a body sent with reset is read (and ignored): the connection stays in step
            assert call(running.port, "POST", "/v1/reset", b'{"why": "new episode"}',
                        conn=conn)[2] == {"status": "reset", "stateful": True}
            assert call(running.port, "GET", "/health", conn=conn)[0] == 200
        finally:
            conn.close()
    finally:
        running.stop()


def test_the_command_refuses_a_bad_export_port_or_timeout_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "absent"), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent'}: no such export folder\n"
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--port", "70000"])
    assert stop.value.code == 2
    assert "--port=70000: must be in [0, 65535]" in capsys.readouterr().err
    for timeout in ("inf", "nan", "0"):  # inf would pass "> 0" and fail every connection
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--read-timeout", timeout])
        assert f"--read-timeout={float(timeout)}: must be finite and > 0" in \
            capsys.readouterr().err


def test_python_dash_m_serves_the_export_on_loopback(export_dir):
    process = subprocess.Popen([sys.executable, "-m", "llm_cluster_env.deploy.serve",
                                str(export_dir), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    try:
        line = process.stdout.readline()
        assert "on http://127.0.0.1:" in line, process.stderr.read() if not line else line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        status, _, reply = call(port, "POST", "/v1/score", score_body())
        assert status == 200 and reply["choice"] == "pod-b"
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT_S)
