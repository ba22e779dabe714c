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

Usage: ``python -m benchmarks.env_speed [--requests 20000] [--repeats 3] [--batching ...]
[--prefix] [--prefix-only]``
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import llm_cluster_env  # noqa: F401  (registers the env)
from benchmarks._common import A100_7B_CAPACITY_RPS, best_of, time_episode
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.sim.cluster import Cluster
from llm_cluster_env.sim.request import Request

BATCHING = ("mixed_chunked", "mixed", "vllm_v0")


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


def run_core(cluster: Cluster, reqs: list[Request], clock) -> float:
    """Seconds (by ``clock``) the simulator core takes for the requests, each routed to the
    replica with the fewest outstanding requests (no env, no observation)."""
    start = clock()
    cluster.reset(reqs)
    reps = cluster.replicas
    while (req := cluster.next_arrival()) is not None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batching", nargs="+", choices=BATCHING, default=list(BATCHING))
    parser.add_argument("--prefix", action="store_true", help="add the prefix-caching speeds")
    parser.add_argument("--prefix-only", action="store_true", help="only the prefix speeds")
    args = parser.parse_args()

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
