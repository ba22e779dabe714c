"""The learned router inside the real vLLM production-stack router.

A temporary copy of the pinned production-stack source (``../shared/thirdparty/production-stack``)
gets ``deploy/production_stack/learned_router.patch`` and runs, in its own Python 3.12 venv
(``make .venv-prodstack/.installed``), as ``python -m vllm_router.app --routing-logic learned``
against stand-in vLLM servers (``deploy/production_stack/standin_vllm.py``) on 127.0.0.1, with
a freshly exported replica-set policy. ``make test-prodstack`` runs this file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.train]

REPO = Path(__file__).resolve().parents[1]
PRODSTACK = REPO.parent / "shared" / "thirdparty" / "production-stack"
VENV = REPO / ".venv-prodstack"
PY312 = VENV / "bin" / "python"
PATCH = REPO / "deploy" / "production_stack" / "learned_router.patch"
STANDIN = REPO / "deploy" / "production_stack" / "standin_vllm.py"

if not PRODSTACK.is_dir():
    pytest.skip(f"{PRODSTACK} is absent (the pinned production-stack source)",
                allow_module_level=True)
if shutil.which("python3.12") is None and not PY312.exists():
    pytest.skip("python3.12 is not installed (production-stack needs >= 3.12)",
                allow_module_level=True)
if not (VENV / ".installed").exists():
    pytest.skip(f"{VENV} is absent: run `make {VENV.name}/.installed` (or make test-prodstack)",
                allow_module_level=True)
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch as th  # noqa: E402
from torch import nn  # noqa: E402

from llm_cluster_env.deploy.router_runtime import ExportedRouter  # noqa: E402
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402
from sb3_warmstart.export import export_policy, sample_observations  # noqa: E402
from sb3_warmstart.policies.replica_set import ReplicaSetPolicy  # noqa: E402

#: Requests sent through the router, and the client threads sending them.
REQUESTS = 240
CLIENTS = 8
#: Every request loop and wait below is bounded by these (seconds).
REQUEST_TIMEOUT_S = 30.0
RUN_DEADLINE_S = 240.0
#: Two replicas whose probabilities differ by less than this are a tie (float32 rounding of
#: two onnxruntime builds may order them differently).
TIE = 1e-6
#: Stand-in engines: (base running, base waiting, base KV usage, model label). The fifth never
#: answers /metrics (an endpoint without stats); every engine drops each 9th completion
#: request unanswered (production-stack's failover re-routes it).
ENGINES = [(2, 0, 0.20, "small"), (3, 1, 0.40, "small"), (4, 0, 0.60, "big"),
           (5, 1, 0.80, "big"), (0, 0, 0.0, "nostats")]
DROP_EVERY = 9


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """An untrained replica-set policy with its scaling fitted on ``lor`` observations of four
    A100s (export in ~15 s)."""
    env_kwargs = {"scenario": "a100x4_conv_70", "num_replicas": 4, "workload": {"qps": 13.6}}
    th.manual_seed(0)
    obs, layout = sample_observations(env_kwargs, requests=300, seed=1)
    env = LLMClusterEnv(**env_kwargs)
    policy = ReplicaSetPolicy(env.observation_space, env.action_space, lambda _: 3e-4,
                              replica_features=layout.replica_features,
                              tail_features=layout.names[layout.replica_block:], embed_dim=16,
                              hidden_dim=32)
    policy.fit_feature_scaling(obs)
    nn.init.orthogonal_(policy.mlp_extractor.score[-1].weight, gain=1.0)
    out = tmp_path_factory.mktemp("export") / "router"
    export_policy(policy, None, env_kwargs, out, label="prodstack", source="test",
                  sample_requests=32)
    return out


@pytest.fixture(scope="module")
def prodstack_src(tmp_path_factory) -> Path:
    """A patched copy of the pinned production-stack; its ``src`` goes on ``PYTHONPATH``."""
    copy = tmp_path_factory.mktemp("prodstack") / "production-stack"
    shutil.copytree(PRODSTACK, copy)
    subprocess.run(["git", "apply", "--whitespace=nowarn", str(PATCH)], cwd=copy, check=True,
                   capture_output=True, timeout=60)
    return copy / "src"


def run312(src: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([str(PY312), "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_patched_scraper_reads_the_v1_kv_metric_and_falls_back_to_the_old_name(prodstack_src):
    code = """
import json
from vllm_router.stats.engine_stats import EngineStats
def scrape(*lines):
    s = EngineStats.from_vllm_scrape("".join(f"# TYPE {n} gauge\\n{n}{{model_name=\\"m\\"}} {v}\\n"
                                             for n, v in lines))
    return [s.num_running_requests, s.num_queuing_requests, s.kv_cache_usage_perc,
            s.gpu_cache_usage_perc]
print(json.dumps([
    scrape(("vllm:num_requests_running", 3), ("vllm:num_requests_waiting", 2),
           ("vllm:kv_cache_usage_perc", 0.37)),
    scrape(("vllm:gpu_cache_usage_perc", 0.25)),
    scrape(("vllm:kv_cache_usage_perc", 0.5), ("vllm:gpu_cache_usage_perc", 0.25)),
    scrape(("vllm:num_requests_running", 1)),
]))
"""
    result = run312(prodstack_src, code)
    assert result.returncode == 0, result.stderr
    v1, old, both, neither = json.loads(result.stdout)
    assert v1 == [3, 2, 0.37, 0.37]         # V1 only: the dashboard gauge gets it too
    assert old == [0, 0, 0.25, 0.25]        # the old name only: the fallback
    assert both == [0, 0, 0.5, 0.25]        # the V1 name wins
    assert neither == [1, 0, None, 0.0]     # neither: None, which the adapter refuses by name


def test_parser_offers_learned_and_requires_its_export_or_config(prodstack_src):
    code = """
import sys
from vllm_router.parsers.parser import parse_args
sys.argv = ["vllm-router", *sys.argv[1:]]
try:
    args = parse_args()
    print("ok", args.routing_logic, args.learned_router_export,
          args.learned_router_mean_output_tokens)
except ValueError as err:
    print("refused:", err)
"""
    base = ["--service-discovery", "static", "--static-backends", "http://127.0.0.1:1",
            "--static-models", "m", "--routing-logic", "learned"]
    result = run312(prodstack_src, code, *base, "--learned-router-export", "/x",
                    "--learned-router-mean-output-tokens", "180")
    assert result.stdout.split() == ["ok", "learned", "/x", "180.0"], result.stderr
    result = run312(prodstack_src, code, *base)
    assert "refused: --learned-router-export or --learned-router-config must be provided" \
        in result.stdout, result.stderr


def post(port: int, i: int) -> tuple[int, str, str | None]:
    """Request ``i``: completions or chat, streamed or not, with or without ``X-Request-Id``
    (alternating). ``(status, body, client id)``."""
    chat, stream, with_id = i % 2 == 0, i % 3 == 0, i % 4 < 2
    words = "word " * (1 + (7 * i) % 60)
    body = {"model": "m", "max_tokens": 1 + i % 6, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    headers = {"Content-Type": "application/json"}
    client_id = f"client-{i}" if with_id else None
    if client_id:
        headers["X-Request-Id"] = client_id
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, resp.read().decode(), client_id
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace"), client_id


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_learned_router_answers_every_request_on_the_scraped_gauges_as_the_runtime_decides(
        tmp_path, export_dir, prodstack_src):
    router_port, *ports = free_ports(1 + len(ENGINES))
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    hardware = {"small": {"speed_k": 1.43, "kv_capacity_k": 117.6,
                          "prefill_tokens_per_s": 9000.0},
                "big": {"speed_k": 3.1, "kv_capacity_k": 410.0, "prefill_tokens_per_s": 21000.0}}
    config = {"hardware": {
        "endpoints": {urls[0]: hardware["small"]},              # by url ...
        "labels": {"small": {**hardware["small"], "speed_k": 1.5}, "big": hardware["big"]},
        "default": {"speed_k": 1.0, "kv_capacity_k": 80.0, "prefill_tokens_per_s": 6000.0}}}
    (tmp_path / "learned.json").write_text(json.dumps(config))
    features_log = tmp_path / "features.jsonl"
    logs = [tmp_path / f"engine{i}.jsonl" for i in range(len(ENGINES))]
    procs: list[subprocess.Popen] = []
    router = None
    t0 = time.monotonic()
    try:
        for port, log, (running, waiting, kv, _) in zip(ports, logs, ENGINES):
            cmd = [str(PY312), str(STANDIN), "--port", str(port), "--running", str(running),
                   "--waiting", str(waiting), "--kv", str(kv), "--log", str(log),
                   "--drop-every", str(DROP_EVERY), "--lifetime-s", str(RUN_DEADLINE_S + 60)]
            if log is logs[-1]:
                cmd += ["--metrics-status", "503"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=open(tmp_path / f"engine-{port}.err", "w")))
        router_log = open(tmp_path / "router.log", "w")
        router = subprocess.Popen(
            [str(PY312), "-m", "vllm_router.app", "--host", "127.0.0.1",
             "--port", str(router_port), "--service-discovery", "static",
             "--static-backends", ",".join(urls), "--static-models", ",".join(["m"] * len(urls)),
             "--static-model-labels", ",".join(e[3] for e in ENGINES),
             "--routing-logic", "learned", "--learned-router-export", str(export_dir),
             "--learned-router-config", str(tmp_path / "learned.json"),
             "--learned-router-mean-output-tokens", "4",
             "--learned-router-features-log", str(features_log),
             "--engine-stats-interval", "1", "--max-instance-failover-reroute-attempts", "2",
             "--log-level", "warning"],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(prodstack_src)),
            stdout=router_log, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            assert router.poll() is None, (tmp_path / "router.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{router_port}/health",
                                            timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(healthy, 90, "the router's /health")
        # two scrapes of every engine that serves /metrics: the router has stats for each
        wait_until(lambda: all(log.exists() and log.read_text().count('"scrape"') >= 2
                               for log in logs[:-1]), 30, "two scrapes of each engine")
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda i: post(router_port, i), range(REQUESTS),
                                    timeout=RUN_DEADLINE_S))
        send_s = time.monotonic() - started
    finally:
        if router is not None:
            stop(router, signal.SIGINT)  # a graceful shutdown closes the routing logic
        for proc in procs:
            stop(proc)
    print(f"\n{REQUESTS} requests in {send_s:.1f} s; whole test {time.monotonic() - t0:.1f} s")

    # every request answered, completely
    for i, (status, body, _) in enumerate(answers):
        assert status == 200, (i, body)
        assert body.rstrip().endswith("data: [DONE]") if i % 3 == 0 else \
            json.loads(body)["choices"], (i, body)

    records = read_jsonl(features_log)
    routes = [r for r in records if r["event"] == "route"]
    arrivals = [r for r in routes if r["retry_of"] is None]
    retries = [r for r in routes if r["retry_of"] is not None]
    engine_logs = [read_jsonl(log) for log in logs]
    received = {(e["request_id"], url) for url, log in zip(urls, engine_logs) for e in log
                if e["event"] == "request"}
    dropped = {(e["request_id"], url) for url, log in zip(urls, engine_logs) for e in log
               if e["event"] == "request" and e["dropped"]}

    # one arrival per client request, under the router's own id (the client's when sent)
    assert len(arrivals) == REQUESTS
    client_ids = {cid for _, _, cid in answers if cid}
    assert client_ids <= {r["request_id"] for r in arrivals}
    assert len({r["request_id"] for r in arrivals}) == REQUESTS
    # each dispatch reached the chosen engine under that id; every drop was re-routed once
    # elsewhere, as a retry (no second arrival)
    assert {(r["request_id"], r["chosen"]) for r in routes} == received
    assert dropped, "no request was dropped: failover untested"
    assert {(r["request_id"], r["retry_of"]) for r in retries} == dropped
    assert all(r["chosen"] != r["retry_of"] for r in retries)

    # the policy saw the stand-ins' gauges (KV usage included), never the endpoint without
    # stats, and never needed the fallback
    served = [{(e["waiting"], e["running"], e["kv"]) for e in log if e["event"] == "scrape"}
              for log in engine_logs]
    for r in routes:
        assert r["fallback"] is None, r
        assert r["endpoints"] == urls[:-1] or (r["retry_of"] and urls[-1] not in r["endpoints"])
        for url, row in zip(r["endpoints"], r["replicas"]):
            gauges = (row["queued"], row["running"], row["kv_usage"])
            assert gauges in served[urls.index(url)], (url, gauges)
            assert row["kv_usage"] > 0
            label = ENGINES[urls.index(url)][3]
            expected = hardware["small"] if url == urls[0] else \
                {**hardware[label], "speed_k": 1.5} if label == "small" else hardware[label]
            assert (row["speed_k"], row["kv_capacity_k"]) == (expected["speed_k"],
                                                              expected["kv_capacity_k"])
        if r["retry_of"] is None and r is not routes[0]:  # the shares of the dispatches
            assert sum(row["dispatch_share"] for row in r["replicas"]) == pytest.approx(1.0)

    # nothing left in flight: each dispatch completed (dropped ones too), and the router
    # closed with an empty table
    completes = {(r["request_id"], r["url"]) for r in records if r["event"] == "complete"}
    assert completes == received
    assert records[-1] == {**records[-1], "event": "close", "in_flight": {}}

    # the decisions are ExportedRouter's on the same features
    runtime = ExportedRouter.load(export_dir)
    disagreements = []
    for r in routes:
        decision = runtime.decide(r["replicas"], r["request"])
        np.testing.assert_allclose(decision.probabilities, r["probabilities"], atol=1e-5)
        ours = r["endpoints"].index(r["chosen"])
        if decision.replica != ours:
            p = decision.probabilities
            disagreements.append(float(abs(p[ours] - p[decision.replica])))
    assert all(gap < TIE for gap in disagreements), disagreements
