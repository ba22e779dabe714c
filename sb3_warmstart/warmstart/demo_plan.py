"""Planning a demonstration collection: which router runs on which env for how many steps.

``policies`` maps router names to weights; ``{"lor": 1.0}`` is single-policy mode. The
requested transitions are split across policies in proportion to the weights (largest
remainder). With ``imbalance`` each policy's share is further split between the base scenario
and an *imbalance* segment whose arrivals alternate a high and a low rate
(``workload.arrival="phases"``, rates a multiple of the scenario's mean rate), so the clone
also sees queues build and drain. Each (policy, segment) pair is one *run*
(:class:`CollectionRun`) with its own built :class:`~llm_cluster_env.config.EnvConfig`.

The plan starts from one typed ``EnvConfig`` (resolved once by the caller, e.g.
:attr:`sb3_warmstart.pipeline.config.TrainingConfig.env`); its ``episode_requests`` is the
episode length of every run, and every run must plan at least one whole episode (imitation
returns complete episodes only). Seeds derive from the root seed through
:meth:`CollectionRun.seed_sequence`, so a run's data does not depend on which other policies
are collected.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llm_cluster_env.config import EnvConfig, PhaseConfig
from llm_cluster_env.routing.heuristics import ROUTERS

SEGMENTS = ("base", "imbalance")
#: Seed streams of a run (the ``stream`` of :meth:`CollectionRun.seed_sequence`).
ENV_STREAM, ROUTER_STREAM, SHUFFLE_STREAM = range(3)


@dataclass(frozen=True)
class ImbalanceSpec:
    """Imbalance segments: arrivals alternate ``high`` and ``low`` rate phases.

    The phases are ``[{duration_s, qps: high_factor * q}, {duration_s, qps: low_factor * q}]``
    with ``q`` the scenario's mean arrival rate (``workload.qps``, or the time-weighted mean of
    a ``phases`` scenario); inter-arrival ``cv`` and request lengths stay the scenario's.

    :param high_factor: rate of the high phase as a multiple of the scenario's rate (1.4 at a
        70 % load scenario is ~100 % of saturation: queues build).
    :param low_factor: rate of the low phase as a multiple of the scenario's rate (queues
        drain).
    :param fraction: share of each policy's transitions collected under imbalance, in (0, 1];
        the rest uses the base scenario.
    :param cycles_per_episode: when ``duration_s`` is ``None``, phases last so that one episode
        holds this many high+low cycles on average:
        ``duration_s = episode_requests / (cycles * (high + low rate))`` seconds.
    :param duration_s: length of each phase (seconds); ``None`` derives it as above.
    """

    high_factor: float = 1.4
    low_factor: float = 0.5
    fraction: float = 0.5
    cycles_per_episode: float = 2.0
    duration_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("high_factor", "low_factor", "cycles_per_episode"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"imbalance.{name}={value!r}: must be a finite number > 0")
        if not self.high_factor > self.low_factor:
            raise ValueError(f"imbalance.high_factor={self.high_factor!r}: must exceed "
                             f"low_factor={self.low_factor!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"imbalance.fraction={self.fraction!r}: must be in (0, 1]")
        if self.duration_s is not None and not (math.isfinite(self.duration_s)
                                                and self.duration_s > 0):
            raise ValueError(f"imbalance.duration_s={self.duration_s!r}: must be > 0 seconds")

    def phases(self, config: EnvConfig) -> tuple[PhaseConfig, PhaseConfig]:
        """The high and the low phase for the scenario ``config``."""
        workload = config.workload
        if workload.arrival in ("poisson", "gamma"):
            base_qps = workload.qps
        elif workload.arrival == "phases":
            total = sum(p.duration_s for p in workload.phases)
            base_qps = sum(p.duration_s * p.qps for p in workload.phases) / total
        else:
            raise ValueError(f"imbalance: workload.arrival={workload.arrival!r} has no "
                             "synthetic rate to modulate (needs poisson, gamma or phases)")
        high, low = self.high_factor * base_qps, self.low_factor * base_qps
        duration = self.duration_s
        if duration is None:
            duration = config.episode_requests / (self.cycles_per_episode * (high + low))
        return (PhaseConfig(duration_s=float(duration), qps=float(high)),
                PhaseConfig(duration_s=float(duration), qps=float(low)))

    def apply(self, config: EnvConfig) -> EnvConfig:
        """``config`` with its arrivals replaced by the alternating phases."""
        return dataclasses.replace(config, workload=dataclasses.replace(
            config.workload, arrival="phases", phases=self.phases(config)))


@dataclass(frozen=True)
class CollectionRun:
    """One (policy, segment) pair of a collection: its env, step budget and seeds.

    :param policy: router name.
    :param segment: ``"base"`` or ``"imbalance"``.
    :param steps: transitions planned (the run returns at least this many, whole episodes).
    :param env_config: what the run's environments are made from.
    """

    policy: str
    segment: str
    steps: int
    env_config: EnvConfig

    def seed_sequence(self, seed: int, stream: int, index: int = 0) -> np.random.SeedSequence:
        """The seed stream ``stream`` (:data:`ENV_STREAM`, :data:`ROUTER_STREAM`,
        :data:`SHUFFLE_STREAM`) of env ``index``."""
        key = (zlib.crc32(self.policy.encode()), SEGMENTS.index(self.segment), stream, index)
        return np.random.SeedSequence(seed, spawn_key=key)


@dataclass(frozen=True)
class CollectionPlan:
    """Validated runs of a collection (see :func:`plan_collection`).

    :param runs: the (policy, segment) runs, policy by policy in the order of ``weights``.
    :param env_config: the base scenario (its ``episode_requests`` is every run's episode
        length, in requests).
    :param total_steps: transitions requested in total.
    :param weights: router name -> weight (floats > 0).
    :param imbalance: the imbalance segments' spec, or ``None``.
    """

    runs: tuple[CollectionRun, ...]
    env_config: EnvConfig
    total_steps: int
    weights: Mapping[str, float]
    imbalance: ImbalanceSpec | None

    @property
    def episode_requests(self) -> int:
        """Requests (= steps) per episode of every run."""
        return self.env_config.episode_requests


def _check_policies(policies: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(policies, Mapping) or not policies:
        raise ValueError(f"policies={policies!r}: must be a non-empty mapping of router name "
                         "-> weight, e.g. {'lor': 1.0}")
    out: dict[str, float] = {}
    for name, weight in policies.items():
        if name not in ROUTERS:
            raise ValueError(f"policies: router={name!r}: unknown router "
                             f"(known: {', '.join(ROUTERS)})")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight <= 0):
            raise ValueError(f"policies[{name!r}]={weight!r}: weight must be a finite number > 0")
        out[name] = float(weight)
    return out


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (Hamilton's method)."""
    weights_arr = np.asarray(weights, dtype=np.float64)
    quotas = total * weights_arr / weights_arr.sum()
    counts = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def plan_collection(*, env_config: EnvConfig, policies: Mapping[str, float], total_steps: int,
                    imbalance: bool | ImbalanceSpec) -> CollectionPlan:
    """Validate the arguments of a collection and split the step budget.

    :param env_config: the base scenario, built (its ``episode_requests`` is the episode
        length).
    :param policies: router name -> weight (> 0).
    :param total_steps: transitions wanted in total (routed requests).
    :param imbalance: ``True`` (default :class:`ImbalanceSpec`), a spec, or ``False``.
    :raises ValueError: naming the argument and value, before any rollout.
    """
    weights = _check_policies(policies)
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) \
            or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be an integer >= 1 transition")
    if imbalance is True:
        imbalance = ImbalanceSpec()
    elif imbalance is False or imbalance is None:
        imbalance = None
    elif not isinstance(imbalance, ImbalanceSpec):
        raise ValueError(f"imbalance={imbalance!r}: must be a bool or an ImbalanceSpec")
    if not isinstance(env_config, EnvConfig):
        raise ValueError(f"env_config: expected an EnvConfig, got {type(env_config).__name__}")

    fraction = imbalance.fraction if imbalance else 0.0
    keys: list[tuple[str, str]] = []
    run_weights: list[float] = []
    for name, weight in weights.items():
        for segment, share in (("base", 1.0 - fraction), ("imbalance", fraction)):
            if share > 0:
                keys.append((name, segment))
                run_weights.append(weight * share)
    steps = largest_remainder(int(total_steps), run_weights)
    smallest = int(np.argmin(steps))
    name, segment = keys[smallest]
    if steps[smallest] < 1:
        raise ValueError(f"total_steps={total_steps}: too small to give policy {name!r} "
                         f"(weight {weights[name]:g}, segment {segment!r}) a single step")
    episode_requests = env_config.episode_requests
    if steps[smallest] < episode_requests:
        raise ValueError(
            f"episode_requests={episode_requests}: exceeds the {steps[smallest]} steps "
            f"planned for policy {name!r} (segment {segment!r}) out of "
            f"total_steps={total_steps}; imitation returns whole episodes only, so lower "
            "episode_requests or raise total_steps")
    imbalance_config = imbalance.apply(env_config) if imbalance else None
    runs = tuple(
        CollectionRun(name, segment, n, imbalance_config if segment == "imbalance"
                      else env_config)
        for (name, segment), n in zip(keys, steps))
    return CollectionPlan(runs=runs, env_config=env_config, total_steps=int(total_steps),
                          weights=weights, imbalance=imbalance)


__all__ = ["ENV_STREAM", "ROUTER_STREAM", "SEGMENTS", "SHUFFLE_STREAM", "CollectionPlan",
           "CollectionRun", "ImbalanceSpec", "largest_remainder", "plan_collection"]
