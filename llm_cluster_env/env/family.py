"""Scenario families: a new cluster and workload for every episode, for training across workloads.

A :class:`ScenarioFamilyConfig` (YAML: ``llm_cluster_env/families/<name>.yaml`` or a path)
describes distributions over scenarios; :class:`ScenarioSampler` draws concrete
:class:`~llm_cluster_env.config.EnvConfig` s from it with an explicit generator, and
:class:`ScenarioFamilyEnv` (``gym.make("LLMClusterFamily-v0", family=...)``) serves one drawn
scenario per episode behind fixed spaces: ``replica_slots`` replica slots (clusters smaller than
that leave the trailing slots empty, see ``ObservationConfig.replica_slots``).

One draw:

1. **Cluster**: ``N`` replicas uniformly from the ``replicas`` range; with probability
   ``mixed_gpus`` two distinct GPU types (drawn by ``gpus`` weight) split the replicas (at
   least one each, the split uniform), otherwise one type for all.
2. **Lengths**: one of ``lengths`` by weight: a packaged empirical summary, or log-normal prompt
   and output lengths whose medians are drawn log-uniformly from their ranges and whose spread
   ``sigma`` uniformly (each snapped to ``grid_points`` values, so capacities can be measured
   once per value and cached).
3. **Arrivals**: one of ``arrivals`` by weight: Poisson; gamma gaps with a coefficient of
   variation drawn log-uniformly from ``cv``; or load phases alternating a high and a low rate
   (ratio from ``high_to_low``, each phase ``phase_s`` seconds) with the same mean.
4. **Load**: uniform in ``load``, as a fraction of the cluster's measured saturation throughput
   for these lengths (:func:`~llm_cluster_env.env.capacity.saturation_throughput`, summed over the
   replicas): the mean arrival rate is ``load * capacity``.
5. **Reward scale** (with ``reward_per_service_time``): rewards are divided by the service time
   of a mean request alone on the cluster's median replica, so scenarios with long and short
   requests weigh alike in training (episode metrics stay in seconds).

**Prefix-sharing families** (all optional: a family without ``workloads`` draws as above, and
a family without ``gpu_memory_utilization``/``host_cache`` draws no replica settings):

* **Replicas**: ``prefix_caching`` for every replica; the KV cache's
  ``gpu_memory_utilization`` on a grid over its range; with probability ``host_cache`` the
  host-memory tier, its size (GB) log-uniform on a grid over ``host_cache_gb``.
* **Workload**: with ``workloads`` non-empty, one of them by weight replaces steps 2-4:

  - ``trace``: a window of ``episode_requests`` consecutive rows of a Mooncake trace, its first
    row uniform in ``trace_rows`` (the window never leaves the range), time-scaled to
    ``load * capacity`` requests/s (``load`` uniform in the choice's ``load`` or the family's);
  - ``multiturn``: multi-turn sessions whose mean turns, mean turn gap (log-uniform) and shared
    system prompt are drawn on grids over their ranges; each turn's new tokens and output come
    from one of ``lengths`` (the prompt's growth per turn); Poisson sessions at
    ``load * capacity`` requests/s (``arrivals`` does not apply);
  - ``system_prompt``: tenants' system prompts whose number (log-uniform), Zipf popularity
    exponent and median length (log-uniform; each tenant's length uniform in
    ``[1 - SYSTEM_PROMPT_SPREAD, 1 + SYSTEM_PROMPT_SPREAD]`` times it) are drawn on grids; user
    parts and outputs from one of ``lengths``; arrivals from ``arrivals`` at
    ``load * capacity``.

  Capacity is the measured saturation throughput with prefix caching *off* (as the packaged
  prefix scenarios define their loads, so a load does not depend on the router): a trace's
  over its ``trace_rows``, a multi-turn workload's with a 60 s turn gap (the mix of turns
  entering the cluster does not depend on the gap). ``holdout`` names scenarios the family
  never draws, kept for validation (:func:`prefix_holdout_scenarios`).

The observation layout is the same for every draw: the prefix-cache feature group is on when
the family's replicas cache prefixes (``prefix_caching``), off otherwise.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_env.config import (
    EnvConfig,
    MultiTurnConfig,
    ObservationConfig,
    PhaseConfig,
    ReplicaConfig,
    RewardConfig,
    SLOConfig,
    SystemPromptConfig,
    WorkloadConfig,
)
from llm_cluster_env.env.capacity import DEFAULT_REQUESTS, saturation_throughput
from llm_cluster_env.env.cluster_env import LLMClusterEnv, check_render_mode
from llm_cluster_env.env.observation import ObservationLayout, optional_replica_features
from llm_cluster_env.hardware import GPUS, MODELS
from llm_cluster_env.sim.cluster import latency_model
from llm_cluster_env.validation import ConfigError, from_dict, require

_MAX_SEED = 2**63 - 1
#: The Mooncake conversation trace (relative to the repository root: raw data is never shipped).
MOONCAKE_CONV_TRACE = "../shared/data/mooncake/conversation_trace.jsonl"
#: Rows (requests) of the Mooncake conversation trace.
MOONCAKE_CONV_ROWS = 12_031
#: A system-prompt draw's tenants have lengths uniform in ``[1 - x, 1 + x]`` times its median.
SYSTEM_PROMPT_SPREAD = 0.5
#: Turn gap (seconds) of the workload that measures a multi-turn draw's capacity.
CAPACITY_TURN_GAP_S = 60.0


def _range(name: str, value: tuple[float, float], low: float = 0.0,
           high: float = math.inf) -> None:
    lo, hi = value
    require(lo <= hi, name, value, "empty or inverted range (need low <= high)")
    require(low <= lo and hi <= high, name, value, f"must lie within [{low}, {high}]")


@dataclass(frozen=True)
class LengthChoice:
    """One way a family draws request lengths.

    :param weight: relative probability of this choice.
    :param kind: ``empirical`` (a packaged summary) or ``lognormal``.
    :param empirical: the packaged summary (``kind="empirical"``).
    :param prompt_median: range of the median prompt length (tokens), drawn log-uniformly.
    :param output_median: range of the median output length (tokens), drawn log-uniformly.
    :param sigma: range of the log-normal spread of both lengths, drawn uniformly.
    """

    weight: float = 1.0
    kind: Literal["empirical", "lognormal"] = "empirical"
    empirical: str = "splitwise_conv"
    prompt_median: tuple[float, float] = (100.0, 8000.0)
    output_median: tuple[float, float] = (5.0, 1000.0)
    sigma: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        require(self.weight > 0, "weight", self.weight, "must be > 0")
        _range("prompt_median", self.prompt_median, 1.0)
        _range("output_median", self.output_median, 1.0)
        _range("sigma", self.sigma, 0.0, 5.0)


@dataclass(frozen=True)
class ArrivalChoice:
    """One way a family draws arrivals.

    :param weight: relative probability of this choice.
    :param kind: ``poisson``, ``gamma`` (bursty) or ``phases`` (a high and a low rate).
    :param cv: range of the gamma gaps' coefficient of variation, drawn log-uniformly.
    :param phase_s: range of each phase's duration (seconds), drawn uniformly.
    :param high_to_low: range of the high phase's rate over the low phase's, drawn uniformly.
    """

    weight: float = 1.0
    kind: Literal["poisson", "gamma", "phases"] = "poisson"
    cv: tuple[float, float] = (1.0, 4.0)
    phase_s: tuple[float, float] = (20.0, 120.0)
    high_to_low: tuple[float, float] = (1.5, 4.0)

    def __post_init__(self) -> None:
        require(self.weight > 0, "weight", self.weight, "must be > 0")
        _range("cv", self.cv, 0.05, 20.0)
        _range("phase_s", self.phase_s, 1e-3)
        _range("high_to_low", self.high_to_low, 1.0)


@dataclass(frozen=True)
class WorkloadChoice:
    """One prefix-sharing workload a family draws (module docstring); the fields of the other
    kinds are ignored.

    :param weight: relative probability of this choice.
    :param kind: ``trace`` (Mooncake trace windows), ``multiturn`` (sessions) or
        ``system_prompt`` (shared system prompts).
    :param load: range of the load (fraction of capacity with caching off); ``None`` = the
        family's ``load``.
    :param trace_path: the Mooncake JSONL trace (``trace``); a relative path is used as
        written when it exists from the working directory, else against the repository root.
    :param trace_length: rows the trace has (checked against the file when it is read).
    :param trace_rows: ``(first, end)``: every window lies in rows ``[first, end)``.
    :param turns_mean: range of the sessions' mean turns (``multiturn``), drawn uniformly.
    :param turn_gap_s: range of the mean gap between a session's turns (seconds),
        drawn log-uniformly.
    :param system_prompt_tokens: range of the system prompt every session starts with
        (tokens; 0 = none), drawn uniformly.
    :param num_prompts: range of the number of tenants (``system_prompt``), log-uniformly.
    :param zipf_s: range of the tenants' Zipf popularity exponent, drawn uniformly.
    :param prompt_tokens: range of the system prompts' median length (tokens), log-uniformly.
    """

    weight: float = 1.0
    kind: Literal["trace", "multiturn", "system_prompt"] = "multiturn"
    load: tuple[float, float] | None = None
    trace_path: str = MOONCAKE_CONV_TRACE
    trace_length: int = MOONCAKE_CONV_ROWS
    trace_rows: tuple[int, int] = (0, MOONCAKE_CONV_ROWS)
    turns_mean: tuple[float, float] = (2.0, 6.0)
    turn_gap_s: tuple[float, float] = (15.0, 120.0)
    system_prompt_tokens: tuple[int, int] = (0, 0)
    num_prompts: tuple[int, int] = (8, 128)
    zipf_s: tuple[float, float] = (0.6, 1.4)
    prompt_tokens: tuple[float, float] = (256.0, 4096.0)

    def __post_init__(self) -> None:
        require(self.weight > 0, "weight", self.weight, "must be > 0")
        if self.load is not None:
            _range("load", self.load, 0.01, 2.0)
        require(self.trace_length >= 2, "trace_length", self.trace_length, "must be >= 2 rows")
        first, end = self.trace_rows
        require(0 <= first < end, "trace_rows", self.trace_rows,
                "empty or inverted row range (need 0 <= first < end)")
        require(end <= self.trace_length, "trace_rows", self.trace_rows,
                f"ends past the trace's last row (trace_length={self.trace_length} rows)")
        _range("turns_mean", self.turns_mean, 1.0, 1e4)
        _range("turn_gap_s", self.turn_gap_s, 1e-3, 1e6)
        _range("system_prompt_tokens", self.system_prompt_tokens, 0, 1 << 20)
        _range("num_prompts", self.num_prompts, 1, 1 << 20)
        _range("zipf_s", self.zipf_s, 0.0, 10.0)
        _range("prompt_tokens", self.prompt_tokens, 2.0, 1 << 20)


def _check_holdout(names: tuple[str, ...]) -> None:
    """Every held-out scenario is a packaged scenario or a YAML file."""
    from llm_cluster_env.scenarios import available_scenarios

    known = available_scenarios()
    for k, name in enumerate(names):
        found = name in known or (Path(name).suffix in (".yaml", ".yml") and Path(name).is_file())
        require(found, f"holdout[{k}]", name, "unknown scenario (a packaged name or a .yaml path)")


@dataclass(frozen=True)
class ScenarioFamilyConfig:
    """Distributions over scenarios (see the module docstring).

    :param name: family name, reported in episode infos.
    :param replicas: inclusive range of the number of replicas.
    :param replica_slots: replica slots of the observation (>= the largest cluster).
    :param gpus: GPU type -> weight.
    :param mixed_gpus: probability that a cluster mixes two GPU types.
    :param model: the model every replica serves.
    :param batching: the engines' batching policy.
    :param load: range of the load, a fraction of measured saturation throughput (a
        workload choice may set its own).
    :param lengths: the length choices (with ``workloads``: the new tokens per turn and the
        user parts of the synthetic workloads).
    :param arrivals: the arrival choices (with ``workloads``: of the ``system_prompt`` ones).
    :param episode_requests: requests per episode.
    :param grid_points: values a continuous length or arrival parameter can take.
    :param capacity_requests: requests per saturation measurement.
    :param reward_per_service_time: divide rewards by a mean request's service time alone.
    :param observation: what the router sees (``replica_slots`` is set from the family).
    :param reward: reward terms (``scale`` is multiplied by the per-scenario scale).
    :param slo: latency targets.
    :param workloads: prefix-sharing workload choices; empty = lengths and arrivals as above.
    :param prefix_caching: every replica caches prefixes (the observation then has the
        prefix-cache features).
    :param gpu_memory_utilization: range of the replicas' GPU memory fraction (sizes the KV
        cache), drawn on a grid; ``None`` = the replica default, no draw.
    :param host_cache: probability that a cluster has the host-memory tier (needs
        ``prefix_caching``).
    :param host_cache_gb: range of the tier's size per replica (GB), drawn log-uniformly.
    :param holdout: scenarios the family never draws, kept for validation (names or paths).
    """

    name: str = "family"
    replicas: tuple[int, int] = (2, 16)
    replica_slots: int = 16
    gpus: dict[str, float] = field(default_factory=lambda: {"a100": 1.0})
    mixed_gpus: float = 0.0
    model: str = "llama-2-7b"
    batching: Literal["mixed_chunked", "mixed", "vllm_v0"] = "mixed_chunked"
    load: tuple[float, float] = (0.3, 0.95)
    lengths: tuple[LengthChoice, ...] = (LengthChoice(),)
    arrivals: tuple[ArrivalChoice, ...] = (ArrivalChoice(),)
    episode_requests: int = 512
    grid_points: int = 6
    capacity_requests: int = DEFAULT_REQUESTS
    reward_per_service_time: bool = True
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    workloads: tuple[WorkloadChoice, ...] = ()
    prefix_caching: bool = False
    gpu_memory_utilization: tuple[float, float] | None = None
    host_cache: float = 0.0
    host_cache_gb: tuple[float, float] = (128.0, 128.0)
    holdout: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        lo, hi = self.replicas
        require(1 <= lo <= hi, "replicas", self.replicas,
                "empty or inverted range (need 1 <= low <= high)")
        require(hi <= self.replica_slots, "replica_slots", self.replica_slots,
                f"fewer slots than the largest cluster ({hi} replicas)")
        require(bool(self.gpus), "gpus", self.gpus, "needs at least one GPU type")
        for gpu, weight in self.gpus.items():
            require(gpu in GPUS, "gpus", gpu, f"unknown GPU (known: {sorted(GPUS)})")
            require(weight > 0, f"gpus.{gpu}", weight, "weight must be > 0")
        require(0.0 <= self.mixed_gpus <= 1.0, "mixed_gpus", self.mixed_gpus, "must be in [0, 1]")
        if self.mixed_gpus > 0:
            require(len(self.gpus) >= 2, "mixed_gpus", self.mixed_gpus,
                    "mixing needs at least two GPU types in 'gpus'")
        require(self.model in MODELS, "model", self.model, f"unknown model (known: {sorted(MODELS)})")
        _range("load", self.load, 0.01, 2.0)
        require(len(self.lengths) > 0, "lengths", self.lengths, "needs at least one choice")
        require(len(self.arrivals) > 0, "arrivals", self.arrivals, "needs at least one choice")
        require(self.episode_requests >= 1, "episode_requests", self.episode_requests,
                "must be >= 1 request")
        require(self.grid_points >= 1, "grid_points", self.grid_points, "must be >= 1")
        require(self.capacity_requests >= 10, "capacity_requests", self.capacity_requests,
                "must be >= 10 requests")
        self._check_prefix_settings()
        object.__setattr__(self, "observation",
                           replace(self.observation, replica_slots=self.replica_slots))

    def _check_prefix_settings(self) -> None:
        """Validate the prefix-sharing fields (workloads, caches, held-out scenarios)."""
        for k, choice in enumerate(self.workloads):
            first, end = choice.trace_rows
            if choice.kind == "trace":
                require(end - first >= self.episode_requests, f"workloads[{k}].trace_rows",
                        choice.trace_rows, f"holds {end - first} rows, fewer than the "
                        f"{self.episode_requests} requests of an episode (episode_requests)")
        if self.prefix_caching:
            require(self.batching != "vllm_v0", "prefix_caching", self.prefix_caching,
                    "not available with batching='vllm_v0'")
        require(0.0 <= self.host_cache <= 1.0, "host_cache", self.host_cache,
                "a probability: must be in [0, 1]")
        if self.host_cache > 0:
            require(self.prefix_caching, "host_cache", self.host_cache,
                    "the host tier extends the prefix cache: set prefix_caching=true")
        _range("host_cache_gb", self.host_cache_gb, 1e-3, 1e6)
        if self.gpu_memory_utilization is not None:
            _range("gpu_memory_utilization", self.gpu_memory_utilization, 0.1, 1.0)
            lowest = self.gpu_memory_utilization[0]
            for gpu in sorted(self.gpus):
                try:
                    ReplicaConfig(model=self.model, gpu=gpu, batching=self.batching,
                                  gpu_memory_utilization=lowest)
                except ConfigError as err:
                    raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization!r}: "
                                      f"the lowest fraction does not fit {self.model} on {gpu} "
                                      f"({err})") from None
        _check_holdout(self.holdout)


# --------------------------------------------------------------------------------- loading
def available_families() -> list[str]:
    """Names of the packaged families (``llm_cluster_env/families/*.yaml``)."""
    folder = resources.files("llm_cluster_env") / "families"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_family(family: str | Mapping[str, Any] | ScenarioFamilyConfig,
                overrides: Mapping[str, Any] | None = None) -> ScenarioFamilyConfig:
    """A family from a packaged name, a YAML path, a mapping or a config, with ``overrides``
    (a mapping of fields) on top; errors name the key (``family.load=...``)."""
    if isinstance(family, ScenarioFamilyConfig):
        data: dict[str, Any] = {}
        base = family
    else:
        base = None
        if isinstance(family, Mapping):
            data = dict(family)
        else:
            path = Path(family)
            if path.suffix in (".yaml", ".yml"):
                if not path.is_file():
                    raise ConfigError(f"family={family!r}: no such file")
                text = path.read_text()
            else:
                resource = resources.files("llm_cluster_env") / "families" / f"{family}.yaml"
                if not resource.is_file():
                    raise ConfigError(f"family={family!r}: unknown family (known: "
                                      f"{', '.join(available_families())}; or a .yaml path)")
                text = resource.read_text()
            import yaml

            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"family={family!r}: expected a mapping of settings")
            data.pop("description", None)
            data.setdefault("name", path.stem)
    if overrides:
        data = {**data, **overrides}
    if base is not None:
        from llm_cluster_env.validation import to_dict

        data = {**to_dict(base), **data}
    return from_dict(ScenarioFamilyConfig, data, path="family")


# --------------------------------------------------------------------------------- sampling
class SharedCache(OrderedDict):
    """A dict of read-only env parts shared by the envs of one process (iteration-time models,
    length samples, priors, service times) that forgets its oldest entries past ``maxsize``,
    so a long run over a family's many length settings keeps its memory bounded."""

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            self.popitem(last=False)


def _grid(rng: np.random.Generator, bounds: tuple[float, float], points: int,
          log: bool = False) -> float:
    lo, hi = bounds
    if points == 1 or lo == hi:
        return float(math.sqrt(lo * hi) if log else 0.5 * (lo + hi))
    values = np.geomspace(lo, hi, points) if log else np.linspace(lo, hi, points)
    return float(values[rng.integers(points)])


def _pick(rng: np.random.Generator, choices: tuple) -> Any:
    weights = np.array([c.weight for c in choices], dtype=np.float64)
    return choices[int(rng.choice(len(choices), p=weights / weights.sum()))]


def _load_info(load: float, capacity: float) -> dict[str, float]:
    """The load (fraction), rate (requests/s) and capacity (requests/s) of a draw, rounded."""
    return {"load": round(load, 3), "qps": round(float(load * capacity), 3),
            "capacity_rps": round(float(capacity), 3)}


_REPLICA_DEFAULTS = {f.name: f.default for f in fields(ReplicaConfig)}


def _without_cache(replica: ReplicaConfig) -> ReplicaConfig:
    """``replica`` with prefix caching (and the host tier) off: what capacity is measured on."""
    return replace(replica, prefix_caching=False, host_cache=False,
                   host_cache_gb=_REPLICA_DEFAULTS["host_cache_gb"])


def resolve_trace_path(path: str) -> str:
    """A family's trace path as read: as written when absolute or present from the working
    directory, else against the repository root of this checkout (as packaged scenarios)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    from llm_cluster_env.scenarios import REPOSITORY_ROOT

    return str(REPOSITORY_ROOT / candidate)


def family_trace_missing(family: ScenarioFamilyConfig) -> str | None:
    """The first trace a family's ``trace`` choices replay that is not there (``None`` when
    every one is, or the family replays none)."""
    for choice in family.workloads:
        if choice.kind == "trace" and not Path(resolve_trace_path(choice.trace_path)).is_file():
            return choice.trace_path
    return None


def _check_traces(family: ScenarioFamilyConfig) -> None:
    """Every trace the family replays exists and has the rows its choice declares."""
    from llm_cluster_env.workload import load_trace

    for k, choice in enumerate(family.workloads):
        if choice.kind != "trace":
            continue
        path = resolve_trace_path(choice.trace_path)
        require(Path(path).is_file(), f"family.workloads[{k}].trace_path", choice.trace_path,
                f"trace file not found (looked at {path}); fetch it, or drop the trace choice "
                "from 'workloads'")
        rows = len(load_trace(path))
        require(rows == choice.trace_length, f"family.workloads[{k}].trace_length",
                choice.trace_length, f"but {path} has {rows} rows")


class ScenarioSampler:
    """Draws scenarios of a family (see the module docstring).

    :param family: the family.
    :param shared_cache: read-only env parts shared with the envs built from the draws.
    """

    def __init__(self, family: ScenarioFamilyConfig, shared_cache: dict | None = None) -> None:
        self.family = family
        self.shared_cache = SharedCache() if shared_cache is None else shared_cache
        self.capacities: dict[tuple, float] = {}
        _check_traces(family)

    def capacity(self, replica: ReplicaConfig, lengths: WorkloadConfig) -> float:
        """Measured saturation throughput (requests/s) of one replica, cached."""
        key = (replica, lengths)
        if key not in self.capacities:
            self.capacities[key] = saturation_throughput(
                replica, lengths, self.family.capacity_requests, shared_cache=self.shared_cache)
        return self.capacities[key]

    def _gpus(self, rng: np.random.Generator, n: int) -> list[str]:
        family = self.family
        names = sorted(family.gpus)
        weights = np.array([family.gpus[g] for g in names], dtype=np.float64)
        weights /= weights.sum()
        if n >= 2 and rng.random() < family.mixed_gpus:
            a, b = rng.choice(len(names), size=2, replace=False, p=weights)
            first = int(rng.integers(1, n))
            return [names[a]] * first + [names[b]] * (n - first)
        return [names[int(rng.choice(len(names), p=weights))]] * n

    def _lengths(self, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
        choice: LengthChoice = _pick(rng, self.family.lengths)
        if choice.kind == "empirical":
            return {"lengths": "empirical", "empirical": choice.empirical}, \
                {"lengths": choice.empirical}
        points = self.family.grid_points
        prompt = _grid(rng, choice.prompt_median, points, log=True)
        output = _grid(rng, choice.output_median, points, log=True)
        sigma = _grid(rng, choice.sigma, min(points, 3))
        return ({"lengths": "lognormal", "prompt_lognormal": (round(prompt, 1), sigma),
                 "output_lognormal": (round(output, 1), sigma)},
                {"lengths": f"lognormal(p~{prompt:.0f}, o~{output:.0f}, s{sigma:.2f})"})

    def _arrivals(self, rng: np.random.Generator, qps: float
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
        choice: ArrivalChoice = _pick(rng, self.family.arrivals)
        points = self.family.grid_points
        if choice.kind == "poisson":
            return {"arrival": "poisson", "qps": qps}, {"arrival": "poisson"}
        if choice.kind == "gamma":
            cv = _grid(rng, choice.cv, points, log=True)
            return {"arrival": "gamma", "qps": qps, "cv": cv}, {"arrival": f"gamma(cv {cv:.2f})"}
        seconds = _grid(rng, choice.phase_s, points)
        ratio = _grid(rng, choice.high_to_low, points)
        low = 2.0 * qps / (1.0 + ratio)
        phases = (PhaseConfig(seconds, ratio * low), PhaseConfig(seconds, low))
        return ({"arrival": "phases", "qps": qps, "phases": phases},
                {"arrival": f"phases({seconds:.0f} s, high/low {ratio:.1f})"})

    def sample(self, rng: np.random.Generator) -> tuple[EnvConfig, dict[str, Any]]:
        """One scenario drawn with ``rng``: its config and a JSON-able description."""
        family = self.family
        lo, hi = family.replicas
        n = int(rng.integers(lo, hi + 1))
        gpus = self._gpus(rng, n)
        replica_fields, replica_info = self._replica_fields(rng)
        replicas = tuple(ReplicaConfig(model=family.model, gpu=g, batching=family.batching,
                                       **replica_fields) for g in gpus)
        draw = self._prefix_workload if family.workloads else self._plain_workload
        workload, lengths, workload_info = draw(rng, replicas)
        reward = family.reward
        if family.reward_per_service_time:
            median = _without_cache(replicas[len(replicas) // 2])
            service = self._service_time(median, lengths)
            reward = replace(reward, scale=reward.scale / service)
        config = EnvConfig(name=family.name, replicas=replicas, workload=workload,
                           observation=family.observation, reward=reward, slo=family.slo,
                           episode_requests=family.episode_requests)
        info = {"family": family.name, "replicas": n,
                "gpus": {g: gpus.count(g) for g in sorted(set(gpus))}, **replica_info,
                **workload_info, "reward_scale": float(reward.scale)}
        return config, info

    def _cluster_capacity(self, replicas: tuple[ReplicaConfig, ...],
                          lengths: WorkloadConfig) -> float:
        """Summed saturation throughput (requests/s) of ``replicas`` with caching off."""
        return sum(self.capacity(_without_cache(r), lengths) for r in replicas)

    def _plain_workload(self, rng: np.random.Generator, replicas: tuple[ReplicaConfig, ...]
                        ) -> tuple[WorkloadConfig, WorkloadConfig, dict[str, Any]]:
        """Steps 2-4 of the module docstring: the workload, its rate-free lengths and info."""
        length_fields, length_info = self._lengths(rng)
        lengths = WorkloadConfig(**length_fields)
        capacity = self._cluster_capacity(replicas, lengths)
        load = float(rng.uniform(*self.family.load))
        arrival_fields, arrival_info = self._arrivals(rng, load * capacity)
        workload = WorkloadConfig(**length_fields, **arrival_fields)
        return workload, lengths, {**length_info, **arrival_info, **_load_info(load, capacity)}

    def _replica_fields(self, rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
        """Replica settings drawn for the whole cluster (none unless the family sets them):
        prefix caching, the KV cache's memory fraction, the host tier and its size (GB)."""
        family = self.family
        fields: dict[str, Any] = {}
        info: dict[str, Any] = {}
        if family.prefix_caching:
            fields["prefix_caching"] = info["prefix_caching"] = True
        if family.gpu_memory_utilization is not None:
            fraction = round(_grid(rng, family.gpu_memory_utilization, family.grid_points), 4)
            fields["gpu_memory_utilization"] = info["gpu_memory_utilization"] = fraction
        if family.host_cache > 0:
            host = bool(rng.random() < family.host_cache)
            size = round(_grid(rng, family.host_cache_gb, family.grid_points, log=True), 1) \
                if host else 0.0
            if host:
                fields.update(host_cache=True, host_cache_gb=size)
            info["host_cache_gb"] = size
        return fields, info

    def _prefix_workload(self, rng: np.random.Generator, replicas: tuple[ReplicaConfig, ...]
                         ) -> tuple[WorkloadConfig, WorkloadConfig, dict[str, Any]]:
        """One of ``workloads`` (module docstring): the workload, its rate-free version (what
        capacity and the reward scale are measured on) and info."""
        choice: WorkloadChoice = _pick(rng, self.family.workloads)
        draw = {"trace": self._trace_fields, "multiturn": self._multiturn_fields,
                "system_prompt": self._system_prompt_fields}[choice.kind]
        fields, lengths, info = draw(rng, choice)
        capacity = self._cluster_capacity(replicas, lengths)
        load = float(rng.uniform(*(choice.load or self.family.load)))
        qps = load * capacity
        if choice.kind == "trace":
            rate, rate_info = {"trace_qps": qps}, {"arrival": "trace"}
        elif choice.kind == "multiturn":
            rate, rate_info = {"arrival": "poisson", "qps": qps}, {"arrival": "poisson sessions"}
        else:
            rate, rate_info = self._arrivals(rng, qps)
        workload = WorkloadConfig(**fields, **rate)
        return workload, lengths, {**info, **rate_info, **_load_info(load, capacity)}

    def _trace_fields(self, rng: np.random.Generator, choice: WorkloadChoice
                      ) -> tuple[dict[str, Any], WorkloadConfig, dict[str, Any]]:
        """A window of ``episode_requests`` rows inside ``choice.trace_rows`` (its first row
        uniform); capacity is measured over the whole row range."""
        n = self.family.episode_requests
        first, end = choice.trace_rows
        start = int(rng.integers(first, end - n + 1))
        base = {"arrival": "trace", "lengths": "trace",
                "trace_path": resolve_trace_path(choice.trace_path)}
        lengths = WorkloadConfig(**base, trace_rows=(first, end))
        info = {"workload": "trace", "lengths": "trace", "trace_rows": [start, start + n]}
        return {**base, "trace_start": start}, lengths, info

    def _multiturn_fields(self, rng: np.random.Generator, choice: WorkloadChoice
                          ) -> tuple[dict[str, Any], WorkloadConfig, dict[str, Any]]:
        """Multi-turn sessions with drawn turns, turn gap, system prompt and per-turn lengths."""
        points = self.family.grid_points
        turns = round(_grid(rng, choice.turns_mean, points), 3)
        gap = round(_grid(rng, choice.turn_gap_s, points, log=True), 3)
        system = int(round(_grid(rng, choice.system_prompt_tokens, points)))
        length_fields, length_info = self._lengths(rng)
        sessions = MultiTurnConfig(turns_mean=turns, turn_gap_s=gap, system_prompt_tokens=system)
        fields = {**length_fields, "prefix": "multiturn", "multiturn": sessions}
        lengths = WorkloadConfig(**{**fields, "multiturn": replace(
            sessions, turn_gap_s=CAPACITY_TURN_GAP_S)})
        info = {"workload": "multiturn", **length_info, "turns_mean": turns, "turn_gap_s": gap,
                "system_prompt_tokens": system}
        return fields, lengths, info

    def _system_prompt_fields(self, rng: np.random.Generator, choice: WorkloadChoice
                              ) -> tuple[dict[str, Any], WorkloadConfig, dict[str, Any]]:
        """Shared system prompts with drawn tenants, popularity, lengths and user parts."""
        points = self.family.grid_points
        tenants = int(round(_grid(rng, choice.num_prompts, points, log=True)))
        zipf = round(_grid(rng, choice.zipf_s, points), 3)
        median = _grid(rng, choice.prompt_tokens, points, log=True)
        span = (max(1, round(median * (1.0 - SYSTEM_PROMPT_SPREAD))),
                max(1, round(median * (1.0 + SYSTEM_PROMPT_SPREAD))))
        length_fields, length_info = self._lengths(rng)
        prompts = SystemPromptConfig(num_prompts=tenants, zipf_s=zipf, prompt_tokens_range=span)
        fields = {**length_fields, "prefix": "system_prompt", "system_prompt": prompts}
        info = {"workload": "system_prompt", **length_info, "num_prompts": tenants,
                "zipf_s": zipf, "system_prompt_tokens": list(span)}
        return fields, WorkloadConfig(**fields), info

    def _service_time(self, replica: ReplicaConfig, lengths: WorkloadConfig) -> float:
        """Seconds a mean request takes alone on ``replica``: its prefill, then its decode
        steps at batch 1 (context: prompt plus half the output)."""
        key = ("service_time", replica, lengths)
        if key not in self.shared_cache:
            from llm_cluster_env.workload import WorkloadGenerator

            window = replica.context_tokens
            sample = WorkloadGenerator(lengths, window, self.shared_cache).length_sample()
            prompt, output = (float(np.mean(x)) for x in sample)
            model = latency_model(replica, self.shared_cache)
            chunk = min(int(prompt), 2048)
            prefill = math.ceil(prompt / chunk) * model.iteration_time(0, 0, ((chunk, 0),))
            decode = max(output - 1.0, 0.0) * model.iteration_time(1, int(prompt + output / 2))
            self.shared_cache[key] = prefill + decode
        return self.shared_cache[key]


def family_layout(family: ScenarioFamilyConfig) -> ObservationLayout:
    """The observation layout every episode of ``family`` shares (its replica slots and
    optional feature groups: the prefix-cache group when every replica caches prefixes,
    ``prefix_caching``, or ``observation.prefix_features`` says so)."""
    config = family.observation
    return ObservationLayout(1, config, optional_replica_features(
        config, caches_prefixes=family.prefix_caching))


def prefix_holdout_scenarios() -> tuple[str, ...]:
    """The scenarios the packaged ``prefix`` family leaves out for validation (its
    ``holdout``): the Mooncake trace's rows it never replays and generator settings outside
    its ranges; build each with ``LLMCluster-v0(scenario=name)``."""
    return load_family("prefix").holdout


# --------------------------------------------------------------------------------- the env
class ScenarioFamilyEnv(gym.Env):
    """``LLMCluster-v0`` with a new scenario from a family every episode (module docstring).

    ## Spaces
    ``Box(0, inf, (replica_slots * F + T,))`` observations, ``Discrete(replica_slots)`` actions;
    only the first ``N`` slots hold replicas in an episode of an ``N``-replica cluster.
    ``action_masks()`` is True for those ``N`` (sb3-contrib's ``MaskablePPO`` reads it; the
    replica-set policies of ``sb3_warmstart`` give the empty slots no probability), and every
    ``info`` carries it as ``info["action_mask"]``. An action naming an empty slot ``k`` routes
    to replica ``k % N`` and sets that step's ``info["invalid_action"]`` (see ``LLMCluster-v0``'s
    Action Space), so ``check_env`` and unmasked learners that sample the whole space run.

    ## Rendering
    ``render_mode="ansi"``: ``render()`` returns the scenario's description and the cluster
    summary of ``LLMCluster-v0``; ``"human"`` prints it at every ``reset`` and ``step``;
    ``None`` renders nothing; other modes are refused at construction.

    ## Episodes
    ``reset`` draws a scenario with the env's ``np_random`` (so ``reset(seed=s)`` replays it),
    builds its cluster and resets it with a seed drawn from the same generator. The first
    ``info`` and the last step's ``info["scenario"]`` describe the scenario; everything else is
    as in ``LLMCluster-v0``. ``options={"scenario": EnvConfig}`` serves that scenario instead.

    ## Arguments
    ``gym.make("LLMClusterFamily-v0", family="generalist", **overrides)``: a packaged family
    name, a YAML path, a mapping or a :class:`ScenarioFamilyConfig`; ``overrides`` replace
    fields. ``shared_cache``: a dict shared by many envs in one process (measured capacities
    and read-only env parts).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(self, family: str | Mapping[str, Any] | ScenarioFamilyConfig = "generalist",
                 render_mode: str | None = None, *, shared_cache: dict | None = None,
                 **overrides: Any) -> None:
        check_render_mode(render_mode, "LLMClusterFamily-v0", self.metadata["render_modes"])
        self.render_mode = render_mode
        self.family = load_family(family, overrides)
        self.sampler = ScenarioSampler(self.family, shared_cache)
        self._layout = layout = family_layout(self.family)
        self.observation_space = spaces.Box(0.0, np.inf, shape=(layout.size,), dtype=np.float32)
        self.action_space = spaces.Discrete(self.family.replica_slots)
        self.env: LLMClusterEnv | None = None
        self.scenario: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        config = options.pop("scenario", None)
        if config is None:
            config, self.scenario = self.sampler.sample(self.np_random)
        else:
            self.scenario = {"family": self.family.name, "given": config.name}
        self.env = LLMClusterEnv(config=config, shared_cache=self.sampler.shared_cache)
        obs, info = self.env.reset(seed=int(self.np_random.integers(_MAX_SEED)),
                                   options=options or None)
        info["scenario"] = self.scenario
        if self.render_mode == "human":
            self.render()
        return obs, info

    def step(self, action):
        if self.env is None:
            raise RuntimeError("step() called before reset()")
        obs, reward, terminated, truncated, info = self.env.step(action)
        if "action_mask" not in info:  # a cluster that fills every slot: all valid
            info["action_mask"] = self.env.action_masks()
            info["invalid_action"] = False
        if terminated or truncated:
            info["scenario"] = self.scenario
        if self.render_mode == "human":
            self.render()
        return obs, reward, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """``(replica_slots,)`` booleans, True for the slots of this episode's replicas."""
        return self._current().action_masks()

    def render(self) -> str | None:
        """The current scenario and cluster as text (``"ansi"``), printed (``"human"``), or
        nothing (``None``); see Rendering."""
        if self.render_mode is None:
            return None
        if self.env is None:
            text = f"{self.family.name}: no scenario yet (call reset())"
        else:
            described = ", ".join(f"{k}={v}" for k, v in self.scenario.items())
            text = f"scenario: {described}\n{self.env.render_text()}"
        if self.render_mode == "human":
            print(text, flush=True)
            return None
        return text

    # the current scenario's env, for routers and evaluation ---------------------------------
    def _current(self) -> LLMClusterEnv:
        if self.env is None:
            raise RuntimeError("no scenario yet: call reset() first")
        return self.env

    @property
    def layout(self) -> ObservationLayout:
        """The layout every episode shares (``replica_slots`` slots; a view of an observation
        finds the replicas present itself)."""
        return self._layout

    @property
    def view(self):
        return self._current().view

    @property
    def num_replicas(self) -> int:
        return self._current().num_replicas

    @property
    def cluster(self):
        return self._current().cluster

    @property
    def pending_request(self):
        return self._current().pending_request

    def routing_context(self):
        return self._current().routing_context()

    def request_records(self):
        return self._current().request_records()

    def episode_metrics(self) -> dict[str, float]:
        return self._current().episode_metrics()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sampler"] = (self.sampler.family, self.sampler.capacities)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        family, capacities = state.pop("sampler")
        self.__dict__.update(state)
        self.sampler = ScenarioSampler(family)
        self.sampler.capacities = dict(capacities)


__all__ = ["CAPACITY_TURN_GAP_S", "MOONCAKE_CONV_ROWS", "MOONCAKE_CONV_TRACE",
           "SYSTEM_PROMPT_SPREAD", "ArrivalChoice", "LengthChoice", "ScenarioFamilyConfig",
           "ScenarioFamilyEnv", "ScenarioSampler", "SharedCache", "WorkloadChoice",
           "available_families", "family_layout", "family_trace_missing", "load_family",
           "prefix_holdout_scenarios", "resolve_trace_path"]
