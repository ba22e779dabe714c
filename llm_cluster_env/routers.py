"""Heuristic routers behind one interface: ``select(view) -> replica index``.

Every router decides from a :class:`~llm_cluster_env.observation.ClusterView` (the named view
of the environment's own observation vector), so heuristics, demonstrations and learned agents
see exactly the same state. Randomised routers draw only from the generator given to
:meth:`Router.reset`; ties go to the lowest replica index, so every router is deterministic
given its seed.

==================  =======================================================================
name                rule
==================  =======================================================================
``round_robin``     replicas in turn
``random``          uniform at random
``lor``             least outstanding requests (queued + running)
``power_of_two``    two replicas at random, the one with fewer outstanding requests
                    (Ray Serve, SGLang's router)
``least_kv``        lowest KV-cache usage, then fewest outstanding requests (AIBrix
                    ``least-kv-cache``)
``least_tokens``    least outstanding tokens: prefill + (estimated) decode work left
``llm_d``           llm-d's default scorer blend: queue depth and KV usage, each min-max
                    scaled across replicas, equal weights
``least_work_time``  outstanding tokens plus this prompt, divided by the replica's decode
                    throughput: the estimated drain time, aware of heterogeneous hardware
``weighted_lor``    Envoy's weighted LEAST_REQUEST: the highest ``weight / (outstanding + 1)
                    ** bias`` with the replica's decode throughput as its weight (bias 1)
==================  =======================================================================
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from llm_cluster_env.observation import ClusterView


class Router:
    """Chooses a replica for each request. Subclasses implement :meth:`select`."""

    name = "router"

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        """Prepare for an episode on ``num_replicas`` replicas, drawing randomness from ``rng``."""
        self.num_replicas = num_replicas
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def select(self, view: ClusterView) -> int:
        raise NotImplementedError

    def tied_choices(self, view: ClusterView) -> np.ndarray | None:
        """Replicas this rule considers equally good for ``view`` (``select`` returns the
        lowest), or ``None`` when the rule is not a function of the observation alone
        (random, round robin). Behaviour cloning uses it to score agreement up to ties."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobinRouter(Router):
    name = "round_robin"

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        super().reset(num_replicas, rng)
        self._next = 0

    def select(self, view: ClusterView) -> int:
        choice = self._next
        self._next = (choice + 1) % self.num_replicas
        return choice


class RandomRouter(Router):
    name = "random"

    def select(self, view: ClusterView) -> int:
        return int(self.rng.integers(self.num_replicas))


def _argmin(values: np.ndarray) -> int:
    return int(np.argmin(values))  # first index among ties


def _all_min(values: np.ndarray) -> np.ndarray:
    return np.flatnonzero(values == values.min())


class LeastOutstandingRequestsRouter(Router):
    name = "lor"

    def select(self, view: ClusterView) -> int:
        return _argmin(view.outstanding_requests)

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(view.outstanding_requests)


class PowerOfTwoRouter(Router):
    name = "power_of_two"

    def select(self, view: ClusterView) -> int:
        if self.num_replicas == 1:
            return 0
        a, b = self.rng.choice(self.num_replicas, size=2, replace=False)
        load = view.outstanding_requests
        return int(b) if load[b] < load[a] else int(a)


class LeastKVRouter(Router):
    name = "least_kv"

    def select(self, view: ClusterView) -> int:
        return int(self.tied_choices(view)[0])

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        candidates = _all_min(view.kv_usage)
        return candidates[_all_min(view.outstanding_requests[candidates])]


class LeastOutstandingTokensRouter(Router):
    name = "least_tokens"

    def select(self, view: ClusterView) -> int:
        return _argmin(view.outstanding_tokens_k)

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(view.outstanding_tokens_k)


def _min_max_scaled(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


class LLMDRouter(Router):
    """llm-d inference-scheduler style: weighted sum of normalised queue and KV scores."""

    name = "llm_d"

    def __init__(self, queue_weight: float = 1.0, kv_weight: float = 1.0) -> None:
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight

    def _score(self, view: ClusterView) -> np.ndarray:
        return (self.queue_weight * _min_max_scaled(view.outstanding_requests.astype(np.float64))
                + self.kv_weight * _min_max_scaled(view.kv_usage.astype(np.float64)))

    def select(self, view: ClusterView) -> int:
        return _argmin(self._score(view))

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(self._score(view))


class LeastWorkTimeRouter(Router):
    name = "least_work_time"

    def _drain_time(self, view: ClusterView) -> np.ndarray:
        return (view.outstanding_tokens_k + view.prompt_tokens_k) / view.speed_k

    def select(self, view: ClusterView) -> int:
        return _argmin(self._drain_time(view))

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(self._drain_time(view))


class WeightedLeastRequestRouter(Router):
    """Envoy-style weighted least request, weights = decode throughput (``speed_k``)."""

    name = "weighted_lor"

    def __init__(self, bias: float = 1.0) -> None:
        self.bias = bias

    def _cost(self, view: ClusterView) -> np.ndarray:
        return (view.outstanding_requests + 1.0) ** self.bias / view.speed_k

    def select(self, view: ClusterView) -> int:
        return _argmin(self._cost(view))

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(self._cost(view))


ROUTERS: MappingProxyType[str, type[Router]] = MappingProxyType({
    cls.name: cls
    for cls in (RoundRobinRouter, RandomRouter, LeastOutstandingRequestsRouter, PowerOfTwoRouter,
                LeastKVRouter, LeastOutstandingTokensRouter, LLMDRouter, LeastWorkTimeRouter,
                WeightedLeastRequestRouter)
})


def make_router(name: str, **kwargs) -> Router:
    """A router by name (see the table above); ``ValueError`` lists the names on a miss."""
    try:
        cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"router={name!r}: unknown router (known: {', '.join(ROUTERS)})") from None
    return cls(**kwargs)
