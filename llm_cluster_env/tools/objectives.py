"""Named objectives over episode metrics: what a router comparison or a planner optimises.

An objective reads the flat ``info["metrics"]`` dict of an episode (or of a simulated rollout;
see :func:`llm_cluster_env.sim.metrics.episode_metrics`) and returns one number:

==============  =================================================  ==========  ================
name            value                                              unit        better
==============  =================================================  ==========  ================
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
minus it for ``goodput``. A minimiser (the rollout planner) ranks candidates by ``loss``; a
report prints ``value``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: Known objective names, in the order of the table above.
OBJECTIVES = ("mean_ttft", "ttft_e2e", "goodput")
_HIGHER_IS_BETTER = {"mean_ttft": False, "ttft_e2e": False, "goodput": True}
_UNITS = {"mean_ttft": "s", "ttft_e2e": "s", "goodput": "requests/s"}


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
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective={self.name!r}: unknown (known: {', '.join(OBJECTIVES)})")
        if self.name == "ttft_e2e":
            w = self.e2e_p99_weight
            if w is None or isinstance(w, bool) or not isinstance(w, (int, float)) \
                    or not (math.isfinite(w) and w >= 0):
                raise ValueError(f"e2e_p99_weight={w!r}: objective 'ttft_e2e' needs a finite "
                                 "weight >= 0 (seconds of mean TTFT per second of p99 E2E)")
        elif self.e2e_p99_weight is not None:
            raise ValueError(f"e2e_p99_weight={self.e2e_p99_weight!r}: only objective "
                             f"'ttft_e2e' takes it, not {self.name!r}")

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
    """The objective called ``name`` (:data:`OBJECTIVES`); refused with a ``ValueError``
    naming the key and value when the name is unknown or the weight is missing or misplaced.

    :param name: ``"mean_ttft"``, ``"ttft_e2e"`` or ``"goodput"``.
    :param e2e_p99_weight: ``ttft_e2e``'s weight of p99 E2E (seconds per second).
    """
    return Objective(name, e2e_p99_weight)


def _read(metrics: Mapping[str, float], key: str) -> float:
    try:
        return float(metrics[key])
    except KeyError:
        raise KeyError(f"metrics: no {key!r} (expected the episode metrics of "
                       "llm_cluster_env.sim.metrics.episode_metrics)") from None


__all__ = ["OBJECTIVES", "Objective", "make_objective"]
