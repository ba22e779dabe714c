"""Decision latency of the exported router at 4, 16 and 64 replicas, one thread.

For each cluster size the script routes an episode of the conversation scenario at ~70% load
with ``lor``, times the heuristics at every decision and records the decision states; each
policy path is then timed over those states in a pass of its own, as a router process that only
routes would run them (thread CPU time and wall time around one call; the first 20 decisions
are warm-up):

* ``onnx session.run``: onnxruntime on the exported graph alone (inputs prepared);
* ``onnx route(array)``: :class:`~llm_cluster_env.deploy.router_runtime.ExportedRouter` from an
  ``(N, F)`` array with its column names (validation included);
* ``onnx route(dicts)``: the same from one ``feature -> value`` mapping per replica;
* ``torch PolicyRouter``: the policy in-process (``sb3_warmstart.policies.router.PolicyRouter``);
* ``lookahead`` (a simulation per replica per request) and ``lor``, for context.

It prints p50 and p99 in microseconds, the ratio of the ONNX p50 at 16 replicas to the aim
(100 us), and per size the ratios torch / ONNX and ONNX / ``lor``. Thread CPU time leaves out
the time the process waits for a core on a shared machine; wall time includes it (its p99 is
the scheduler's). The policy is the replica-set policy of ``--run`` (a run folder, checkpoint or
policy zip) or, by default, a freshly built one of the default architecture with its scaling
fitted on ``lor`` observations (latency does not depend on the weights). The machine's load
average is printed: on a shared machine the absolute numbers move with it.

Usage: ``python benchmarks/router_latency.py [--run runs/default] [--decisions 400]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th

from llm_cluster_env.deploy.router_runtime import ExportedRouter
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router

AIM_P50_US = 100.0
SIZES = (4, 16, 64)
WARMUP = 20
RPS_PER_REPLICA = 3.4  # ~70% of one A100's saturation throughput on conversation lengths


def conv(replicas: int, requests: int) -> dict:
    return {"scenario": "a100x4_conv_70", "num_replicas": replicas,
            "workload": {"qps": RPS_PER_REPLICA * replicas}, "episode_requests": requests}


def default_policy():
    """The default replica-set policy architecture, scaling fitted on ``lor`` observations."""
    from sb3_warmstart.export import sample_observations
    from sb3_warmstart.pipeline.config import PPOConfig
    from sb3_warmstart.policies.replica_set import ReplicaSetPolicy

    defaults = PPOConfig()
    obs, layout = sample_observations(conv(4, 300), requests=300, seed=1)
    env = LLMClusterEnv(**conv(4, 10))
    policy = ReplicaSetPolicy(env.observation_space, env.action_space, lambda _: 3e-4,
                              replica_features=layout.replica_features,
                              tail_features=layout.names[layout.replica_block:],
                              embed_dim=defaults.set_embed_dim,
                              hidden_dim=defaults.set_hidden_dim)
    policy.fit_feature_scaling(obs)
    return policy, None, conv(4, 300), "default architecture (untrained weights)"


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """``(thread CPU time, wall time)`` of one call ``fn(*args, **kwargs)``, microseconds."""
    cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
    fn(*args, **kwargs)
    return (time.thread_time_ns() - cpu) / 1000.0, (time.perf_counter_ns() - wall) / 1000.0


def measure(size: int, decisions: int, runtime: ExportedRouter, policy_router,
            lookahead_decisions: int) -> dict[str, list[tuple[float, float]]]:
    """Per-decision timings at ``size`` replicas. The heuristics are timed while the episode
    runs (``lookahead`` needs the live simulator); the decision states are recorded, and each
    policy path is then timed over all of them in its own pass, as a router process that does
    nothing else would run."""
    env = LLMClusterEnv(**conv(size, decisions + WARMUP))
    layout = env.layout
    tail = layout.names[layout.replica_block:layout.history_offset]
    columns = layout.replica_features
    env.reset(seed=size)
    routers = {name: make_router(name) for name in ("lor", "lookahead")}
    for router in routers.values():
        router.reset(size, np.random.default_rng(0))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in (
        "onnx session.run", "onnx route(array)", "onnx route(dicts)", "torch PolicyRouter",
        "lookahead", "lor")}
    states = []
    done, step = False, 0
    while not done:
        view = env.view
        request = {name: float(view.obs[layout.replica_block + i])
                   for i, name in enumerate(tail)}
        states.append((np.array(view.obs, copy=True), request))
        heuristics = ["lor"] + (["lookahead"] if step < WARMUP + lookahead_decisions else [])
        for name in heuristics:
            t = timed(routers[name].select, view)
            if step >= WARMUP:
                times[name].append(t)
        _, _, done, _, _ = env.step(routers["lor"].select(view))
        step += 1
    session, outputs = runtime.session, list(runtime.schema["outputs"])
    passes = {
        "onnx session.run": lambda obs, matrix, request: (
            session.run, (outputs, {"replicas": matrix[None], "request": np.asarray(
                [list(request.values())], dtype=np.float32)}), {}),
        "onnx route(array)": lambda obs, matrix, request: (
            runtime.route, (matrix, request), {"columns": columns}),
        "onnx route(dicts)": lambda obs, matrix, request: (
            runtime.route, ([dict(zip(columns, map(float, row))) for row in matrix], request),
            {}),
        "torch PolicyRouter": lambda obs, matrix, request: (
            policy_router.select, (layout.view(obs),), {}),
    }
    for name, prepare in passes.items():
        runtime.reset()
        policy_router.reset(size, np.random.default_rng(0))
        for i, (obs, request) in enumerate(states):
            matrix = np.ascontiguousarray(layout.view(obs).replicas, dtype=np.float32)
            fn, args, kwargs = prepare(obs, matrix, request)
            t = timed(fn, *args, **kwargs)
            if i >= WARMUP:
                times[name].append(t)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run folder, checkpoint or policy zip (default: a fresh "
                                      "policy of the default architecture)")
    parser.add_argument("--decisions", type=int, default=400,
                        help="timed decisions per cluster size (default %(default)s)")
    parser.add_argument("--lookahead-decisions", type=int, default=60,
                        help="decisions the (slow) lookahead router is timed on")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    from sb3_warmstart.export import export_policy
    from sb3_warmstart.policies.router import PolicyRouter

    if args.run:
        from sb3_warmstart.policies.run_loading import load_policy

        model, obs_rms, env_kwargs, _, label = load_policy(Path(args.run))
        policy, what = model.policy, f"{label} ({args.run})"
    else:
        policy, obs_rms, env_kwargs, what = default_policy()
    with tempfile.TemporaryDirectory() as tmp:
        export_policy(policy, obs_rms, env_kwargs, Path(tmp) / "export", label="bench",
                      source=what, sample_requests=32)
        runtime = ExportedRouter.load(Path(tmp) / "export", num_threads=1)
    if runtime.fixed_replicas is not None:
        raise SystemExit("--run: the latency table needs a replica-set policy (any cluster "
                         "size); this one routes exactly "
                         f"{runtime.fixed_replicas} replicas")
    policy_router = PolicyRouter(policy, obs_rms)
    load = os.getloadavg()
    print(f"policy: {what}; one thread (torch and onnxruntime); load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on {os.cpu_count()} CPUs")
    results = {n: measure(n, args.decisions, runtime, policy_router, args.lookahead_decisions)
               for n in SIZES}
    p50 = {}
    for column, label in ((0, "thread CPU time"), (1, "wall time")):
        print(f"\n{label}, microseconds per decision")
        print(f"{'router':<22}" + "".join(f"{f'N={n} p50':>12}{'p99':>9}" for n in SIZES))
        for name in results[SIZES[0]]:
            cells = []
            for n in SIZES:
                values = np.asarray([t[column] for t in results[n][name]])
                p50[name, n, column] = float(np.percentile(values, 50))
                cells.append(f"{p50[name, n, column]:12.1f}{np.percentile(values, 99):9.1f}")
            print(f"{name:<22}" + "".join(cells))
    onnx16 = p50["onnx route(array)", 16, 0]
    print(f"\nONNX route(array) p50 at 16 replicas: {onnx16:.1f} us of CPU time = "
          f"{onnx16 / AIM_P50_US:.2f} x the {AIM_P50_US:g} us aim "
          f"(wall {p50['onnx route(array)', 16, 1]:.1f} us)")
    for n in SIZES:
        print(f"N={n}: torch PolicyRouter / ONNX route(array) = "
              f"{p50['torch PolicyRouter', n, 0] / p50['onnx route(array)', n, 0]:.1f}x; "
              f"ONNX route(array) / lor = "
              f"{p50['onnx route(array)', n, 0] / p50['lor', n, 0]:.1f}x (CPU-time p50s)")


if __name__ == "__main__":
    main()
