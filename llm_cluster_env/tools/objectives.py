"""Named objectives over episode metrics: what a router comparison or a planner optimises.

An objective reads the flat ``info["metrics"]`` dict of an episode (or of a simulated rollout;
see :func:`llm_cluster_env.sim.metrics.episode_metrics`) and returns one number:

==============  =================================================  ==========  ================
name            value                                              unit        better
==============  =================================================  ==========  ================
``mean_e2e``    ``e2e_mean``                                       s           lower
``mean_ttft``   ``ttft_mean``                                      s           lower
``ttft_e2e``    ``ttft_mean + e2e_p99_weight * e2e_p99``           s           lower
``goodput``     ``goodput_rps`` (requests meeting TTFT and TPOT    requests/s  higher
                targets per second of the episode's span)
==============  =================================================  ==========  ================

``ttft_e2e`` is the issue-21 aim as one number: lower mean TTFT without giving up the tail.
``e2e_p99_weight`` (no default here: the caller's config holds it) prices one second of p99
E2E in seconds of mean TTFT; on ``mooncake_conv`` p99 E2E is ~20x mean TTFT, so 0.05 weighs
them about equally there.

**Sign convention.** :attr:`Objective.higher_is_better` says which way the value improves, and
:meth:`Objective.loss` is always *lower is better*: the value itself for the latency objectives,
minus it for ``goodput``. A minimiser ranks candidates by ``loss``; a
report prints ``value``.

**Rollouts.** A planner scores a simulated copy of the cluster, not an episode: it has a few
requests, no meaningful p99 and no episode span. :func:`rollout_loss` is each objective's
per-rollout form over the requests the copy finished (lower is better, additive over
requests, so the requests every candidate treats alike cancel in a comparison):

* ``mean_e2e``: request-seconds in system from the decision ``now`` on,
  ``sum(finish - max(arrival, now))`` (the rollout planner's historical cost, its ``area``);
* ``mean_ttft``: request-seconds waiting for a first token from ``now`` on,
  ``sum(max(0, first_token - max(arrival, now)))``;
* ``ttft_e2e``: ``mean_ttft``'s sum ``+ e2e_weight x`` ``mean_e2e``'s sum. In a rollout the
  E2E term is the *total* (mean) E2E, the planner's handle on the tail: a rollout of a few
  dozen requests has no p99 to read;
* ``goodput``: minus the number of requests that meet both SLO targets (TTFT from the
  request's arrival, TPOT over its whole output; a one-token output needs the TTFT target
  only), as :func:`llm_cluster_env.sim.metrics.episode_metrics` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from llm_cluster_env.validation import require

#: Known objective names, in the order of the table above.
OBJECTIVES = ("mean_e2e", "mean_ttft", "ttft_e2e", "goodput")
#: Objectives a scenario family's demonstrations can choose their expert by
#: (:mod:`sb3_warmstart.warmstart.family_demos`): positive, lower-is-better and with no weight to
#: set, since the choice uses a relative margin.
DEMO_OBJECTIVES = ("mean_e2e", "mean_ttft")
_HIGHER_IS_BETTER = {"mean_e2e": False, "mean_ttft": False, "ttft_e2e": False, "goodput": True}
_UNITS = {"mean_e2e": "s", "mean_ttft": "s", "ttft_e2e": "s", "goodput": "requests/s"}


@dataclass(frozen=True)
class Objective:
    """One named objective (build with :func:`make_objective`).

    :param name: one of :data:`OBJECTIVES`.
    :param e2e_p99_weight: ``ttft_e2e`` only: seconds of mean TTFT one second of p99 E2E
        latency is worth (finite, >= 0); ``None`` for the other objectives.
    """

    name: str
    e2e_p99_weight: float | None = None

    def __post_init__(self) -> None:
        require(self.name in OBJECTIVES, "objective", self.name,
                f"unknown (known: {', '.join(OBJECTIVES)})")
        w = self.e2e_p99_weight
        if self.name == "ttft_e2e":
            require(is_finite_number(w) and w >= 0, "e2e_p99_weight", w,
                    "objective 'ttft_e2e' needs a finite weight >= 0 (seconds of mean TTFT per "
                    "second of p99 E2E)")
        else:
            require(w is None, "e2e_p99_weight", w, f"only objective 'ttft_e2e' takes it, not "
                                                    f"{self.name!r}")

    @property
    def higher_is_better(self) -> bool:
        """True when a larger :meth:`value` is better (``goodput``)."""
        return _HIGHER_IS_BETTER[self.name]

    @property
    def unit(self) -> str:
        """Unit of :meth:`value`."""
        return _UNITS[self.name]

    def value(self, metrics: Mapping[str, float]) -> float:
        """The objective in its own unit and direction (see the module table)."""
        if self.name == "mean_e2e":
            return _read(metrics, "e2e_mean")
        if self.name == "mean_ttft":
            return _read(metrics, "ttft_mean")
        if self.name == "ttft_e2e":
            return _read(metrics, "ttft_mean") + self.e2e_p99_weight * _read(metrics, "e2e_p99")
        return _read(metrics, "goodput_rps")

    def loss(self, metrics: Mapping[str, float]) -> float:
        """Lower is better for every objective: ``value``, or ``-value`` for ``goodput``."""
        value = self.value(metrics)
        return -value if self.higher_is_better else value

    def __str__(self) -> str:
        if self.name == "ttft_e2e":
            return f"ttft_e2e(e2e_p99_weight={self.e2e_p99_weight})"
        return self.name


def make_objective(name: str, *, e2e_p99_weight: float | None = None) -> Objective:
    """The objective called ``name`` (:data:`OBJECTIVES`); refused with a ``ConfigError``
    naming the key and value when the name is unknown or the weight is missing or misplaced.

    :param name: ``"mean_e2e"``, ``"mean_ttft"``, ``"ttft_e2e"`` or ``"goodput"``.
    :param e2e_p99_weight: ``ttft_e2e``'s weight of p99 E2E (seconds per second).
    """
    return Objective(name, e2e_p99_weight)


def _read(metrics: Mapping[str, float], key: str) -> float:
    try:
        return float(metrics[key])
    except KeyError:
        raise KeyError(f"metrics: no {key!r} (expected the episode metrics of "
                       "llm_cluster_env.sim.metrics.episode_metrics)") from None


def is_finite_number(value) -> bool:
    """A real number (not a bool) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


class _Finished(Protocol):
    """What :func:`rollout_loss` reads of a finished request (times in seconds)."""

    arrival_time: float
    first_token_time: float
    finish_time: float
    output_tokens: int


def ttft_seconds_after(requests: Iterable[_Finished], now: float) -> float:
    """Request-seconds spent waiting for a first token after ``now`` (seconds):
    ``sum(max(0, first_token - max(arrival, now)))``."""
    total = 0.0
    for r in requests:
        start = r.arrival_time if r.arrival_time > now else now
        if r.first_token_time > start:
            total += r.first_token_time - start
    return total


def e2e_seconds_after(requests: Iterable[_Finished], now: float) -> float:
    """Request-seconds in system after ``now`` (seconds): ``sum(finish - max(arrival, now))``."""
    return sum(r.finish_time - (r.arrival_time if r.arrival_time > now else now)
               for r in requests)


def slo_met_count(requests: Iterable[_Finished], ttft_slo_s: float, tpot_slo_s: float) -> int:
    """Requests meeting TTFT <= ``ttft_slo_s`` and TPOT <= ``tpot_slo_s`` (seconds; seconds
    per token after the first), the rule of ``episode_metrics``' ``goodput_rps``."""
    met = 0
    for r in requests:
        if r.first_token_time - r.arrival_time > ttft_slo_s:
            continue
        if r.output_tokens > 1 and \
                (r.finish_time - r.first_token_time) / (r.output_tokens - 1) > tpot_slo_s:
            continue
        met += 1
    return met


def rollout_loss(name: str, finished: Iterable[_Finished], now: float, *,
                 area: float | None = None, e2e_weight: float = 0.0,
                 ttft_slo_s: float | None = None, tpot_slo_s: float | None = None) -> float:
    """The per-rollout loss of objective ``name`` over the requests a simulated copy finished
    (see the module docstring; lower is better; request-seconds, or minus a request count for
    ``goodput``).

    :param name: one of :data:`OBJECTIVES`.
    :param finished: the copy's finished requests (every request it held, once drained).
    :param now: the decision time (seconds).
    :param area: the copy's time-integral of requests in system from ``now`` (request-seconds),
        used for the E2E term when given (exactly the simulator's own accumulator).
    :param e2e_weight: ``ttft_e2e``: seconds of TTFT one second of E2E is worth (>= 0).
    :param ttft_slo_s: ``goodput``: the TTFT target (seconds, > 0).
    :param tpot_slo_s: ``goodput``: the TPOT target (seconds per token, > 0).
    """
    finished = list(finished)
    if name == "mean_e2e":
        return area if area is not None else e2e_seconds_after(finished, now)
    if name == "mean_ttft":
        return ttft_seconds_after(finished, now)
    if name == "ttft_e2e":
        e2e = area if area is not None else e2e_seconds_after(finished, now)
        return ttft_seconds_after(finished, now) + e2e_weight * e2e
    if name == "goodput":
        if ttft_slo_s is None or tpot_slo_s is None:
            raise ValueError(f"ttft_slo_s={ttft_slo_s!r}, tpot_slo_s={tpot_slo_s!r}: objective "
                             "'goodput' needs both SLO targets")
        return -float(slo_met_count(finished, ttft_slo_s, tpot_slo_s))
    raise ValueError(f"objective={name!r}: unknown (known: {', '.join(OBJECTIVES)})")


__all__ = ["OBJECTIVES", "Objective", "e2e_seconds_after", "make_objective", "rollout_loss",
           "is_finite_number", "slo_met_count", "ttft_seconds_after"]
