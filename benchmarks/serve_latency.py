"""Round-trip latency of the HTTP scoring service (``llm_cluster_env.deploy.serve``) at 16
endpoints, over loopback, one client thread.

The decision states come from an episode of the conversation scenario on ``--endpoints``
A100 replicas at ~70% load routed by ``lor`` (real per-replica features, within the schema's
ranges); each becomes a ``POST /v1/score`` body with endpoint ids ``pod-0``, ``pod-1``, ....
The service runs in its own process (``python -m llm_cluster_env.deploy.serve EXPORT --port
0``, one onnxruntime thread), the client in this one, with ``http.client``:

* ``keep-alive``: one persistent connection, requests one after another (what a router with a
  connection pool does), ``--requests`` timed after ``--warmup``;
* ``new connection``: a TCP connection per request (``--fresh`` of them);
* ``in-process``: the service's own work without HTTP (JSON parse, validation, onnxruntime,
  reply encoding), to show what the HTTP layer adds.

It prints p50, p90, p99 and the mean in milliseconds (wall time from sending the request to
having parsed the reply), the p50 against the aim (1 ms), the body size, and the machine's load
average and CPU count: on a shared machine the figures move with the load. The policy is the
export ``--export`` or, by default, a fresh export of the default replica-set architecture
(latency does not depend on the weights; needs the training stack).

Usage: ``python -m benchmarks.serve_latency [--export exports/default] [--requests 2000]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_cluster_env.deploy.router_runtime import ExportedRouter  # noqa: E402
from llm_cluster_env.deploy.serve import ScoringService, parse_json  # noqa: E402
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402
from llm_cluster_env.routing.heuristics import make_router  # noqa: E402

AIM_P50_MS = 1.0
RPS_PER_REPLICA = 3.4  # ~70% of one A100's saturation throughput on conversation lengths
TIMEOUT_S = 30.0


def score_bodies(endpoints: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JSON bodies from consecutive decisions of a ``lor``-routed episode."""
    env = LLMClusterEnv(scenario="a100x4_conv_70", num_replicas=endpoints,
                        workload={"qps": RPS_PER_REPLICA * endpoints},
                        episode_requests=count)
    layout = env.layout
    tail = layout.names[layout.replica_block:layout.history_offset]
    router = make_router("lor")
    env.reset(seed=seed)
    router.reset(endpoints, np.random.default_rng(seed))
    ids = [f"pod-{i}" for i in range(endpoints)]
    bodies, done = [], False
    while not done:
        view = env.view
        body = {"endpoints": [{"id": i, "features": dict(zip(layout.replica_features,
                                                             map(float, row)))}
                              for i, row in zip(ids, view.replicas)],
                "request": {name: float(view.obs[layout.replica_block + k])
                            for k, name in enumerate(tail)}}
        bodies.append(json.dumps(body).encode())
        _, _, done, _, _ = env.step(router.select(view))
    return bodies[:count]


def default_export(folder: Path) -> str:
    """Export the default replica-set architecture into ``folder``; what it is."""
    import torch as th

    from benchmarks.router_latency import default_policy
    from sb3_warmstart.export import export_policy

    th.set_num_threads(1)
    policy, obs_rms, env_kwargs, what = default_policy()
    export_policy(policy, obs_rms, env_kwargs, folder, label="bench", source=what,
                  sample_requests=32)
    return what


def start_service(export_dir: Path) -> tuple[subprocess.Popen, int]:
    """The service in its own process on a free loopback port: ``(process, port)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "llm_cluster_env.deploy.serve",
                                str(export_dir), "--host", "127.0.0.1", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO_ROOT, env=env)
    line = process.stdout.readline()
    if "http://127.0.0.1:" not in line:
        process.kill()
        raise SystemExit(f"the service did not start: {line}{process.stderr.read()[-2000:]}")
    return process, int(line.rsplit(":", 1)[1].split("/")[0])


def post(conn: http.client.HTTPConnection, body: bytes) -> float:
    """Wall milliseconds of one ``POST /v1/score`` on ``conn``, reply parsed."""
    start = time.perf_counter()
    conn.request("POST", "/v1/score", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    elapsed = (time.perf_counter() - start) * 1e3
    if response.status != 200:
        raise SystemExit(f"the service refused a body: {reply}")
    return elapsed


def keep_alive(port: int, bodies: list[bytes], warmup: int) -> np.ndarray:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        times = [post(conn, body) for body in bodies]
    finally:
        conn.close()
    return np.asarray(times[warmup:])


def new_connections(port: int, bodies: list[bytes]) -> np.ndarray:
    times = []
    for body in bodies:
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        try:
            post(conn, body)
        finally:
            conn.close()
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times)


def in_process(export_dir: Path, bodies: list[bytes], warmup: int) -> np.ndarray:
    service = ScoringService(ExportedRouter.load(export_dir, num_threads=1))
    times = []
    for body in bodies:
        start = time.perf_counter()
        json.dumps(service.score(parse_json(body)), separators=(",", ":")).encode()
        times.append((time.perf_counter() - start) * 1e3)
    return np.asarray(times[warmup:])


def row(name: str, ms: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"{name:<16}{len(ms):>8}{p50:>9.3f}{p90:>9.3f}{p99:>9.3f}{ms.mean():>9.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, help="export folder (default: a fresh export "
                                                    "of the default architecture)")
    parser.add_argument("--endpoints", type=int, default=16,
                        help="endpoints per request (default %(default)s)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="timed keep-alive requests (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="untimed requests first (default %(default)s)")
    parser.add_argument("--fresh", type=int, default=300,
                        help="timed requests on a new connection each (default %(default)s)")
    args = parser.parse_args(argv)
    for name in ("endpoints", "requests", "fresh"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
    bodies = score_bodies(args.endpoints, args.requests + args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        if args.export is None:
            export_dir, what = Path(tmp) / "export", None
            what = default_export(export_dir)
        else:
            export_dir, what = args.export, str(args.export)
        router = ExportedRouter.load(export_dir)
        if router.fixed_replicas not in (None, args.endpoints):
            parser.error(f"--export: a flat policy of {router.fixed_replicas} replicas; pass "
                         f"--endpoints {router.fixed_replicas}")
        process, port = start_service(export_dir)
        try:
            load = os.getloadavg()
            served = keep_alive(port, bodies, args.warmup)
            fresh = new_connections(port, bodies[: args.fresh])
        finally:
            process.terminate()
            process.wait(timeout=TIMEOUT_S)
        local = in_process(export_dir, bodies, args.warmup)
    sizes = [len(b) for b in bodies]
    print(f"policy: {what}; {args.endpoints} endpoints x {len(router.replica_features)} "
          f"features, bodies {min(sizes)}-{max(sizes)} bytes; service: its own process, one "
          f"onnxruntime thread; client: one thread, http.client\nmachine: {os.cpu_count()} "
          f"CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at "
          f"the start; Python {platform.python_version()}")
    print(f"\n{'path':<16}{'requests':>8}{'p50 ms':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    print(row("keep-alive", served))
    print(row("new connection", fresh))
    print(row("in-process", local))
    p50 = float(np.percentile(served, 50))
    print(f"\nkeep-alive p50 {p50:.3f} ms = {p50 / AIM_P50_MS:.2f} x the {AIM_P50_MS:g} ms aim")


if __name__ == "__main__":
    main()
