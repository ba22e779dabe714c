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
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_env.config import (
    EnvConfig,
    ObservationConfig,
    PhaseConfig,
    ReplicaConfig,
    RewardConfig,
    SLOConfig,
    WorkloadConfig,
)
from llm_cluster_env.env.capacity import DEFAULT_REQUESTS, saturation_throughput
from llm_cluster_env.env.cluster_env import LLMClusterEnv, check_render_mode
from llm_cluster_env.env.observation import ObservationLayout, optional_replica_features
from llm_cluster_env.hardware import GPUS, MODELS
from llm_cluster_env.sim.cluster import latency_model
from llm_cluster_env.validation import ConfigError, from_dict, require

_MAX_SEED = 2**63 - 1


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
class ScenarioFamilyConfig:
    """Distributions over scenarios (see the module docstring).

    :param name: family name, reported in episode infos.
    :param replicas: inclusive range of the number of replicas.
    :param replica_slots: replica slots of the observation (>= the largest cluster).
    :param gpus: GPU type -> weight.
    :param mixed_gpus: probability that a cluster mixes two GPU types.
    :param model: the model every replica serves.
    :param batching: the engines' batching policy.
    :param load: range of the load, a fraction of measured saturation throughput.
    :param lengths: the length choices.
    :param arrivals: the arrival choices.
    :param episode_requests: requests per episode.
    :param grid_points: values a continuous length or arrival parameter can take.
    :param capacity_requests: requests per saturation measurement.
    :param reward_per_service_time: divide rewards by a mean request's service time alone.
    :param observation: what the router sees (``replica_slots`` is set from the family).
    :param reward: reward terms (``scale`` is multiplied by the per-scenario scale).
    :param slo: latency targets.
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
        object.__setattr__(self, "observation",
                           replace(self.observation, replica_slots=self.replica_slots))


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


class ScenarioSampler:
    """Draws scenarios of a family (see the module docstring).

    :param family: the family.
    :param shared_cache: read-only env parts shared with the envs built from the draws.
    """

    def __init__(self, family: ScenarioFamilyConfig, shared_cache: dict | None = None) -> None:
        self.family = family
        self.shared_cache = SharedCache() if shared_cache is None else shared_cache
        self.capacities: dict[tuple, float] = {}

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
        length_fields, length_info = self._lengths(rng)
        lengths = WorkloadConfig(**length_fields)
        replicas = tuple(ReplicaConfig(model=family.model, gpu=g, batching=family.batching)
                         for g in gpus)
        capacity = sum(self.capacity(r, lengths) for r in replicas)
        load = float(rng.uniform(*family.load))
        arrival_fields, arrival_info = self._arrivals(rng, load * capacity)
        workload = WorkloadConfig(**length_fields, **arrival_fields)
        reward = family.reward
        if family.reward_per_service_time:
            median = replicas[len(replicas) // 2]
            service = self._service_time(median, lengths)
            reward = replace(reward, scale=reward.scale / service)
        config = EnvConfig(name=family.name, replicas=replicas, workload=workload,
                           observation=family.observation, reward=reward, slo=family.slo,
                           episode_requests=family.episode_requests)
        info = {"family": family.name, "replicas": n,
                "gpus": {g: gpus.count(g) for g in sorted(set(gpus))}, **length_info,
                **arrival_info, "load": round(load, 3), "qps": round(float(load * capacity), 3),
                "capacity_rps": round(float(capacity), 3), "reward_scale": float(reward.scale)}
        return config, info

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
    optional feature groups; the family's replicas do not cache prefixes)."""
    config = family.observation
    return ObservationLayout(1, config, optional_replica_features(config, caches_prefixes=False))


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


__all__ = ["ArrivalChoice", "LengthChoice", "ScenarioFamilyConfig", "ScenarioFamilyEnv",
           "ScenarioSampler", "SharedCache", "available_families", "family_layout",
           "load_family"]
