"""Env steps per second with the ``lor`` router, and jump mode vs iteration-by-iteration mode.

Prints, from one run on this machine (ratios are what to compare across machines):

1. ``LLMCluster-v0`` steps/s at ~80% load for 4 and 16 replicas, raw env and through
   ``gym.make`` wrappers, with the ``lor`` router; and the raw env without the engine-model
   signals (``observation.engine_signals``, on by default), with what they cost per step;
2. the jump/iteration speed-up across loads, for the whole env step and for the simulator core
   alone (cluster events, no observation building), plus iterations simulated per event.

Both are measured for each batching policy given (default: all three; loads are relative to
the default policy's capacity).

3. ``--prefix``: prefix caching: steps/s at 4 replicas on the synthetic multi-turn workload
   (``multiturn_chat`` at ~80% load) with the cache and the prefix features on, against the
   same workload with caching off and the default scenario at ~80% load, in one run (raw env,
   ``lor``); also the simulator core alone (cluster events) with caching on and off.

4. ``--scaling``: env steps per CPU-second (process time) at 4/16/64/256/1,024 replicas
   (``--sizes``), random routing, ~80% load, ``--scaling-requests`` (4,000) requests per
   episode, with the engine-model signals on (default) and off, and the simulator core alone
   (requests per CPU-second, no env and no observation, random routing) on the same
   workloads: the ratios to compare.
5. ``--replay``: ``llm_cluster_env.tools.replay.replay`` of the first ``--replay-rows`` rows of
   the conversation trace on ``a100x4_vllm_v0`` with ``round_robin`` (a router that reads no
   feature) and with ``lor``, against the simulator core alone on the same requests, requests
   per CPU-second.
6. ``--rollout-share``: the main job's PPO (default configuration, cold start) for
   ``--rollout-steps`` env steps: the share of its CPU time spent collecting rollouts.
7. ``--profile N [N ...]``: cProfile of one ``--scaling-requests`` episode per cluster size
   (random routing, ~80% load, default observation), the functions with the most cumulative
   time: where a step's time goes.

Usage: ``python -m benchmarks.env_speed [--requests 20000] [--repeats 3] [--batching ...]
[--prefix] [--prefix-only] [--scaling [--sizes 4 16 64 256 1024]] [--replay]
[--rollout-share] [--profile 4 16] [--only]``
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import llm_cluster_env  # noqa: F401  (registers the env)
from benchmarks._common import A100_7B_CAPACITY_RPS, best_of, time_episode
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.sim.cluster import Cluster
from llm_cluster_env.sim.request import Request

BATCHING = ("mixed_chunked", "mixed", "vllm_v0")
VIDUR_DATA = Path(os.environ.get("LLM_CLUSTER_VIDUR_DATA")
                  or Path(__file__).resolve().parents[2] / "shared" / "data" / "vidur")


def env_kwargs(replicas: int, load: float, requests: int, mode: str = "jump",
               batching: str = "mixed_chunked", engine_signals: bool = True) -> dict:
    return dict(scenario="a100x4_conv_70", num_replicas=replicas, episode_requests=requests,
                simulation_mode=mode, replica={"batching": batching},
                workload={"qps": load * replicas * A100_7B_CAPACITY_RPS},
                observation={"engine_signals": engine_signals})


def steps_per_second(replicas: int, load: float, requests: int, repeats: int,
                     wrapped: bool = False, mode: str = "jump",
                     batching: str = "mixed_chunked", engine_signals: bool = True) -> float:
    kwargs = env_kwargs(replicas, load, requests, mode, batching, engine_signals)
    env = gym.make("LLMCluster-v0", **kwargs) if wrapped else LLMClusterEnv(**kwargs)
    steps = requests

    def run() -> float:
        seconds, n = time_episode(env.unwrapped if not wrapped else _WrappedTimer(env), "lor")
        assert n == steps
        return seconds

    return steps / best_of(repeats, run)


class _WrappedTimer:
    """Drives a ``gym.make`` env (with its wrappers) through ``time_episode``'s interface."""

    def __init__(self, env):
        self._env = env
        self.num_replicas = env.unwrapped.num_replicas

    def reset(self, seed):
        self._obs, _ = self._env.reset(seed=seed)

    @property
    def view(self):
        return self._env.unwrapped.layout.view(self._obs)

    def step(self, action):
        out = self._env.step(action)
        self._obs = out[0]
        return out


def core_seconds(replicas: int, load: float, requests: int, jump: bool,
                 batching: str = "mixed_chunked") -> tuple[float, int, int]:
    """Simulator core alone: route by least outstanding requests straight on the replicas."""
    env = LLMClusterEnv(**env_kwargs(replicas, load, requests, batching=batching))
    episode = env.workload.sample(requests, np.random.default_rng(0))
    cluster = Cluster.from_configs(env.config.replica_configs, jump=jump)
    reqs = [Request(i, t, p, o) for i, (t, p, o) in enumerate(zip(
        episode.arrival_times.tolist(), episode.prompt_tokens.tolist(),
        episode.output_tokens.tolist()))]
    seconds = run_core(cluster, reqs, time.perf_counter)
    return seconds, cluster.num_events, sum(r.num_iterations for r in cluster.replicas)


def run_core(cluster: Cluster, reqs: list[Request], clock,
             rng: np.random.Generator | None = None) -> float:
    """Seconds (by ``clock``) the simulator core takes for the requests, each routed to the
    replica with the fewest outstanding requests, or with ``rng`` to a uniformly random one
    (no env, no observation)."""
    start = clock()
    cluster.reset(reqs)
    reps = cluster.replicas
    n = len(reps)
    while (req := cluster.next_arrival()) is not None:
        if rng is not None:
            cluster.dispatch(req, int(rng.integers(n)))
            continue
        loads = [len(r.waiting) + len(r.running) for r in reps]
        cluster.dispatch(req, loads.index(min(loads)))
    cluster.drain()
    return clock() - start


def _cpu_seconds(env: LLMClusterEnv, requests: int) -> float:
    """Process CPU seconds of one ``lor`` episode (reset excluded)."""
    router = make_router("lor")
    env.reset(seed=0)
    router.reset(env.num_replicas, np.random.default_rng(0))
    start = time.process_time()
    steps = 0
    done = False
    while not done:
        _, _, done, _, _ = env.step(router.select(env.view))
        steps += 1
    assert steps == requests
    return time.process_time() - start


#: ``multiturn_chat`` at ~80% of its capacity with caching off (4 x 2.92 req/s).
MULTITURN_80 = 0.8 * 4 * 2.92


def prefix_speed(requests: int, repeats: int) -> None:
    """Steps/s with prefix caching on the multi-turn workload, against its cache-off twin and
    the default scenario, alternating the runs so that machine noise hits all alike."""
    cases = {
        "default scenario, ~80% load": dict(scenario="a100x4_conv_70", workload={
            "qps": 0.8 * 4 * A100_7B_CAPACITY_RPS}),
        "multi-turn, caching off": dict(scenario="multiturn_chat", workload={
            "qps": MULTITURN_80}, replica={"prefix_caching": False}),
        "multi-turn, caching on": dict(scenario="multiturn_chat", workload={"qps": MULTITURN_80}),
        "multi-turn, caching on, no prefix features": dict(
            scenario="multiturn_chat", workload={"qps": MULTITURN_80},
            observation={"prefix_features": False}),
    }
    envs = {name: LLMClusterEnv(episode_requests=requests, **kw) for name, kw in cases.items()}
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, env in envs.items():
            best[name] = min(best[name], _cpu_seconds(env, requests))
    print(f"3) prefix caching, 4 replicas, lor, raw env (best of {repeats} x {requests:,} steps, "
          "process CPU time: other jobs on the machine disturb it less than wall time)")
    reference = best["multi-turn, caching off"]
    for name in cases:
        print(f"{name:>44}  {requests / best[name]:>8,.0f} steps/s  "
              f"{reference / best[name]:>5.2f}x caching off")
    core = {}
    for caching in (False, True):
        env = envs["multi-turn, caching on" if caching else "multi-turn, caching off"]
        episode = env.workload.sample(requests, np.random.default_rng(0))
        timings = []
        for _ in range(repeats):
            cluster = Cluster.from_configs(env.config.replica_configs)
            reqs = [Request(i, t, p, o, c) for i, (t, p, o, c) in enumerate(zip(
                episode.arrival_times.tolist(), episode.prompt_tokens.tolist(),
                episode.output_tokens.tolist(), episode.chains))]
            timings.append(run_core(cluster, reqs, time.process_time))
        core[caching] = min(timings)
    print(f"{'simulator core (events only), caching off':>44}  {requests / core[False]:>8,.0f} "
          f"req/s\n{'simulator core, caching on':>44}  {requests / core[True]:>8,.0f} req/s  "
          f"{core[False] / core[True]:>5.2f}x caching off")


def _random_episode_cpu(env: LLMClusterEnv, seed: int = 0) -> tuple[float, int]:
    """Process CPU seconds and steps of one episode with uniformly random routing."""
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    n = env.num_replicas
    start = time.process_time()
    steps = 0
    done = False
    while not done:
        _, _, done, _, _ = env.step(int(rng.integers(n)))
        steps += 1
    return time.process_time() - start, steps


def scaling(sizes: list[int], requests: int, repeats: int) -> list[dict]:
    """Steps per CPU-second, signals on and off, and the core's requests per CPU-second, per
    cluster size (random routing, ~80% load); best of ``repeats``, the runs of one size
    alternating so machine noise hits them alike."""
    rows = []
    print(f"4) env steps per CPU-second, random routing, ~80% load, {requests:,}-request "
          f"episodes (best of {repeats}; process CPU time)")
    print(f"{'replicas':>8}  {'signals on':>10}  {'signals off':>11}  {'on/off':>6}  "
          f"{'core req/s':>10}  {'on/core':>7}")
    for n in sizes:
        envs = {sig: LLMClusterEnv(**env_kwargs(n, 0.8, requests, engine_signals=sig))
                for sig in (True, False)}
        episode = envs[True].workload.sample(requests, np.random.default_rng(0))
        best = {True: math.inf, False: math.inf, "core": math.inf}
        for _ in range(repeats):
            for sig, env in envs.items():
                seconds, steps = _random_episode_cpu(env)
                assert steps == requests
                best[sig] = min(best[sig], seconds)
            cluster = Cluster.from_configs(envs[True].config.replica_configs)
            reqs = [Request(i, t, p, o) for i, (t, p, o) in enumerate(zip(
                episode.arrival_times.tolist(), episode.prompt_tokens.tolist(),
                episode.output_tokens.tolist()))]
            best["core"] = min(best["core"], run_core(cluster, reqs, time.process_time,
                                                      np.random.default_rng(0)))
        row = {"replicas": n, "signals_on": requests / best[True],
               "signals_off": requests / best[False], "core": requests / best["core"]}
        rows.append(row)
        print(f"{n:>8}  {row['signals_on']:>10,.0f}  {row['signals_off']:>11,.0f}  "
              f"{row['signals_on'] / row['signals_off']:>6.2f}  {row['core']:>10,.0f}  "
              f"{row['signals_on'] / row['core']:>7.2f}", flush=True)
    return rows


def profile(sizes: list[int], requests: int, top: int = 25) -> None:
    """cProfile of one episode per cluster size: random routing, ~80% load, default
    observation; the ``top`` functions by cumulative time."""
    import cProfile
    import pstats

    for n in sizes:
        env = LLMClusterEnv(**env_kwargs(n, 0.8, requests))
        print(f"7) cProfile, {n} replicas, {requests:,} steps, random routing, ~80% load")
        profiler = cProfile.Profile()
        profiler.enable()
        _random_episode_cpu(env)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def replay_speed(rows: int, repeats: int) -> dict:
    """Requests per CPU-second of ``replay`` (round_robin, lor) and of the core alone."""
    import tempfile

    from llm_cluster_env.tools.replay import replay

    source = VIDUR_DATA / "processed_traces" / "splitwise_conv.csv"
    with open(source) as f:
        head = [next(f) for _ in range(rows + 1)]
    tmp = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    tmp.writelines(head)
    tmp.close()
    trace = tmp.name
    env_kwargs_ = {"scenario": "a100x4_vllm_v0"}
    best = {"round_robin": math.inf, "lor": math.inf, "core": math.inf}
    served = None
    for _ in range(repeats):
        for router in ("round_robin", "lor"):
            start = time.process_time()
            result = replay(trace, env_kwargs_, router)
            best[router] = min(best[router], time.process_time() - start)
            served = int(result.metrics["num_requests"])
        env = LLMClusterEnv(**env_kwargs_)
        reqs = [Request(i, t, p, o) for i, (t, p, o) in enumerate(zip(
            result.records["arrival_s"].tolist(), result.records["prompt_tokens"].tolist(),
            result.records["output_tokens"].tolist()))]
        cluster = Cluster.from_configs(env.config.replica_configs)
        best["core"] = min(best["core"], run_core(cluster, reqs, time.process_time))
    os.unlink(trace)
    out = {k: served / v for k, v in best.items()}
    print(f"5) replay of {served:,} trace requests on a100x4_vllm_v0, requests per CPU-second "
          f"(best of {repeats}; replay includes building the env and reading the trace)")
    for name, value in out.items():
        print(f"{name:>12}  {value:>10,.0f}  {value / out['core']:>5.2f}x core")
    return out


def rollout_share(steps: int) -> dict:
    """The main job's PPO (``train/warmstart.py``'s default configuration, cold start: no
    demonstrations) for ``steps`` env steps: CPU seconds of ``learn()`` and of its ``train()``
    calls; the rest is collecting rollouts (env steps, policy forward passes, the buffer)."""
    import torch

    from benchmarks.train_speed import timed_learn
    from sb3_warmstart.pipeline.config import load_config
    from sb3_warmstart.pipeline.ppo_stage import build_session

    torch.set_num_threads(1)
    config = load_config()
    session = build_session(config, None)
    timing = timed_learn(session.model, steps)
    total, spent = timing.total_s, [timing.train_s]
    out = {"steps": steps, "learn_cpu_s": total, "train_cpu_s": spent[0],
           "rollout_share": (total - spent[0]) / total}
    print(f"6) main job PPO (default config, cold start), {steps:,} env steps: learn() "
          f"{total:.1f} CPU-s, train() {spent[0]:.1f} CPU-s, collecting rollouts "
          f"{100 * out['rollout_share']:.0f}% of PPO time")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batching", nargs="+", choices=BATCHING, default=list(BATCHING))
    parser.add_argument("--prefix", action="store_true", help="add the prefix-caching speeds")
    parser.add_argument("--prefix-only", action="store_true", help="only the prefix speeds")
    parser.add_argument("--scaling", action="store_true",
                        help="steps per CPU-second by cluster size (section 4)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64, 256, 1024])
    parser.add_argument("--scaling-requests", type=int, default=4000)
    parser.add_argument("--replay", action="store_true", help="replay speed (section 5)")
    parser.add_argument("--replay-rows", type=int, default=10000)
    parser.add_argument("--rollout-share", action="store_true",
                        help="the main job's rollout share of PPO time (section 6)")
    parser.add_argument("--rollout-steps", type=int, default=4096)
    parser.add_argument("--profile", type=int, nargs="+", metavar="REPLICAS",
                        help="cProfile of one episode per cluster size (section 7)")
    parser.add_argument("--only", action="store_true",
                        help="only the sections asked for by --scaling/--replay/--profile")
    args = parser.parse_args()

    if args.scaling:
        scaling(args.sizes, args.scaling_requests, args.repeats)
        print()
    if args.replay:
        replay_speed(args.replay_rows, args.repeats)
        print()
    if args.rollout_share:
        rollout_share(args.rollout_steps)
        print()
    if args.profile:
        profile(args.profile, args.scaling_requests)
        print()
    if args.only:
        return
    if args.prefix or args.prefix_only:
        prefix_speed(args.requests, args.repeats)
        if args.prefix_only:
            return
        print()
    for batching in args.batching:
        print(f"=== batching: {batching}")
        print(f"1) env steps/s, lor router, ~80% load (best of {args.repeats})")
        print(f"{'replicas':>8}  {'raw env':>10}  {'gym.make':>10}  {'raw, no engine signals':>22}")
        for replicas in (4, 16):
            raw = steps_per_second(replicas, 0.8, args.requests, args.repeats, batching=batching)
            wrapped = steps_per_second(replicas, 0.8, args.requests, args.repeats, wrapped=True,
                                       batching=batching)
            bare = steps_per_second(replicas, 0.8, args.requests, args.repeats, batching=batching,
                                    engine_signals=False)
            print(f"{replicas:>8}  {raw:>10,.0f}  {wrapped:>10,.0f}  {bare:>22,.0f}"
                  f"  (signals cost {1e6 * (1 / raw - 1 / bare):.0f} us/step)")

        print("\n2) jump vs iteration-by-iteration, 4 replicas, same workload and decisions")
        print(f"{'load':>5}  {'env x':>6}  {'core x':>6}  {'iters/req':>9}  {'events/req':>10}  "
              f"{'core jump req/s':>15}")
        for load in (0.1, 0.3, 0.5, 0.7, 0.9):
            n = args.requests // 2
            env_jump = steps_per_second(4, load, n, args.repeats, batching=batching)
            env_iter = steps_per_second(4, load, n, args.repeats, mode="iteration",
                                        batching=batching)
            jump = min((core_seconds(4, load, n, True, batching) for _ in range(args.repeats)),
                       key=lambda r: r[0])
            it = min((core_seconds(4, load, n, False, batching) for _ in range(args.repeats)),
                     key=lambda r: r[0])
            print(f"{load:>5.1f}  {env_jump / env_iter:>6.1f}  {it[0] / jump[0]:>6.1f}  "
                  f"{it[2] / n:>9.1f}  {jump[1] / n:>10.2f}  {n / jump[0]:>15,.0f}")
        print()


if __name__ == "__main__":
    main()
