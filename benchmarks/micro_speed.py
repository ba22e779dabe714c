"""Per-call costs of the simulator's hot helpers, against the budgets the tests used to assert.

Speed is measured here, not in tests (a test that times code flakes on a shared machine).
Prints the best of 5 repeats for:

* ``IterationTimeModel.iteration_time`` (Llama-2-7B / A100 / TP1): a pure-decode call (32
  requests, ~32k tokens of context) and a mixed call (plus two prompt chunks) -- budget 20 us /
  50 us per call;
* ``WorkloadGenerator.sample(2000)`` for Poisson, gamma (CV 2) and phased arrivals with
  empirical lengths -- budget 10 ms;
* loading the Azure conversation trace (19,366 rows) from ``../shared/data/vidur`` when present
  -- budget 1 s.

Each line prints the measured value, the budget and their ratio (< 1 is within budget).

Usage: ``python benchmarks/micro_speed.py``
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from llm_cluster_env.config import PhaseConfig, WorkloadConfig
from llm_cluster_env.sim.latency import IterationTimeModel
from llm_cluster_env.workload import WorkloadGenerator, load_trace

REPO_ROOT = Path(__file__).resolve().parents[1]
CONV_TRACE = "processed_traces/splitwise_conv.csv"


def _best(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _report(what: str, seconds: float, budget: float, unit: float, label: str) -> None:
    print(f"{what:<52} {seconds / unit:9.2f} {label}  (budget {budget / unit:g} {label}, "
          f"ratio {seconds / budget:.2f})")


def main() -> None:
    model = IterationTimeModel.for_replica("llama-2-7b", "a100", 1)
    calls = 20_000

    def decode() -> None:
        for k in range(calls):
            model.iteration_time(32, 32_000 + k)

    def mixed() -> None:
        chunks = [(512, 1024), (64, 0)]
        for _ in range(calls):
            model.iteration_time(32, 32_000, chunks)

    _report("iteration_time, pure decode (per call)", _best(5, decode) / calls, 20e-6, 1e-6,
            "us")
    _report("iteration_time, decode + 2 prompt chunks (per call)", _best(5, mixed) / calls,
            50e-6, 1e-6, "us")
    rng = np.random.default_rng(0)
    for name, kwargs in (("poisson", {"arrival": "poisson"}),
                         ("gamma cv 2", {"arrival": "gamma", "cv": 2.0}),
                         ("phases", {"arrival": "phases", "phases": (PhaseConfig(60, 3.0),
                                                                     PhaseConfig(30, 9.0))})):
        generator = WorkloadGenerator(WorkloadConfig(lengths="empirical", **kwargs), 4096)
        generator.sample(2000, rng)
        _report(f"WorkloadGenerator.sample(2000), {name}",
                _best(5, lambda g=generator: g.sample(2000, rng)), 10e-3, 1e-3, "ms")
    data = Path(os.environ.get("LLM_CLUSTER_VIDUR_DATA",
                               REPO_ROOT.parent / "shared" / "data" / "vidur"))
    if (data / CONV_TRACE).is_file():
        _report("load_trace(splitwise_conv.csv, 19,366 rows)",
                _best(3, lambda: load_trace(data / CONV_TRACE)), 1.0, 1.0, "s ")
    else:
        print(f"load_trace: skipped ({data / CONV_TRACE} not found)")


if __name__ == "__main__":
    main()
