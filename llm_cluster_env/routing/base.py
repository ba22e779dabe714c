"""The router interface: ``reset(num_replicas, rng)``, ``select(view) -> replica index``.

:class:`Router` is what every router implements (heuristics in :mod:`llm_cluster_env.routing.heuristics`,
the look-ahead baseline in :mod:`llm_cluster_env.routing.lookahead`, learned policies wrapped by
``sb3_warmstart``); :class:`ScoredRouter` turns one cost per replica into a decision.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from llm_cluster_env.env.observation import ClusterView, RoutingContext


class Router:
    """Chooses a replica for each request. Subclasses implement :meth:`select`.

    ``requires_context``: the router reads ``view.context`` (a
    :class:`~llm_cluster_env.env.observation.RoutingContext`: the pending request, the replicas)
    besides the observation, so it cannot act on a bare observation vector.

    ``reads``: the per-replica features (names in ``layout.replica_features``) the router reads
    from the view; the env computes only those for it (``LLMClusterEnv.observe_for``; the
    others are NaN) and refuses, naming the router and the feature, one it cannot provide.
    ``None`` (the default): the whole observation, as an agent reads it. ``reads_if_present``:
    features read when the observation has them (the prefix features, zeros without). The
    request features, the arrival rate and the decision history are always there.
    """

    name = "router"
    requires_context = False
    reads: tuple[str, ...] | None = None
    reads_if_present: tuple[str, ...] = ()

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        """Prepare for an episode on ``num_replicas`` replicas, drawing randomness from ``rng``."""
        self.num_replicas = num_replicas
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def select(self, view: ClusterView) -> int:
        raise NotImplementedError

    def context(self, view: ClusterView) -> RoutingContext:
        """``view.context``, or a ``ValueError`` saying that this router needs one."""
        if view.context is None:
            raise ValueError(f"router {self.name!r} needs the routing context (the pending "
                             "request and the replicas), which a bare observation vector does "
                             "not carry: route through env.view, or layout.view(obs, context)")
        return view.context

    def tied_choices(self, view: ClusterView) -> np.ndarray | None:
        """Replicas this rule considers equally good for ``view`` (``select`` returns one of
        them: the lowest or a random one, see the module table), or ``None`` when the rule is
        not a function of the observation alone (random, round robin, power of two). Behaviour
        cloning uses it to score agreement up to ties."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _all_min(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(values == values.min())


class ScoredRouter(Router):
    """A router that sends each request to a replica of least ``cost(view)``.

    Subclasses define :meth:`cost` (one number per replica, lower is better) and ``ties``:
    ``"lowest"`` takes the lowest replica index among the least-cost replicas, ``"random"`` a
    uniform one from the router's generator (drawn only when there is a tie, so one seed and one
    sequence of observations give one sequence of decisions). :meth:`tied_choices` returns all
    of them.
    """

    ties = "lowest"

    def cost(self, view: ClusterView) -> np.ndarray:
        raise NotImplementedError

    def select(self, view: ClusterView) -> int:
        # plain Python on the short cost list: ~3x faster than array ops for a handful of
        # replicas, and this runs on every env step
        costs = self.cost(view).tolist()
        least = min(costs)
        if self.ties == "lowest":
            return costs.index(least)
        tied = [i for i, c in enumerate(costs) if c == least]
        if len(tied) == 1:
            return tied[0]
        return tied[int(self.rng.random() * len(tied))]  # uniform among the ties

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(self.cost(view))


def build_router(routers: Mapping[str, type[Router]], name: str, **kwargs) -> Router:
    """``routers[name](**kwargs)``; ``ValueError`` naming ``name`` and listing the known names
    on a miss (what ``make_router`` and ``make_any_router`` share)."""
    try:
        cls = routers[name]
    except KeyError:
        raise ValueError(f"router={name!r}: unknown router "
                         f"(known: {', '.join(routers)})") from None
    return cls(**kwargs)


__all__ = ["Router", "ScoredRouter", "build_router"]
