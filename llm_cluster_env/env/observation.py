"""The one observation builder used by heuristic routers, demonstrations and agents.

The observation is a flat ``float32`` vector. Its layout (see :class:`ObservationLayout`,
``layout.names`` gives every feature's name):

==========================  =====================================================  ==========
feature                     meaning                                                unit
==========================  =====================================================  ==========
``r{i}/queued``             requests waiting in replica *i*'s queue                requests
``r{i}/running``            requests in replica *i*'s batch (prefilling+decoding)  requests
``r{i}/kv_usage``           KV-cache blocks in use / capacity                      fraction
``r{i}/prefill_tokens_k``   prompt (and recompute) tokens not yet prefilled        1k tokens
``r{i}/decode_tokens_k``    output tokens still to generate (see below)            1k tokens
``r{i}/dispatch_share``     share of the last ``dispatch_share_window`` requests   fraction
``r{i}/speed_k``            decode throughput at a reference batch (static)        1k tok/s
``r{i}/kv_capacity_k``      KV-cache capacity (static)                             1k tokens
``req/prompt_tokens_k``     prompt length of the request being routed              1k tokens
``req/output_tokens_k``     its output length (only with ``output_length_oracle``) 1k tokens
``global/arrival_rate``     exponentially decayed arrival rate                     requests/s
``hist/t-{k}/r{i}``         one-hot of the decision ``k`` steps ago (optional)     0/1
==========================  =====================================================  ==========

Optional per-replica features follow each replica's base features, in groups switched on by
the configuration (:class:`ReplicaFeatureGroup`; :func:`optional_replica_features` gives the
names), the prefix-cache group first. The engine-model group (:class:`EngineFeatures`,
``ObservationConfig.engine_signals``, on by default; see :mod:`llm_cluster_env.routing.engine_model`):

==========================  =====================================================  ==========
feature                     meaning                                                unit
==========================  =====================================================  ==========
``r{i}/est_wait_s``         estimated time until the pending request's prefill      s
                            would start on replica *i*
``r{i}/est_ttft_s``         estimated time to its first token there                 s
``r{i}/est_delta_s``        estimated increase of total time in system: its own     s
                            latency plus the slow-down of replica *i*'s requests
==========================  =====================================================  ==========

The prefix-cache group (:class:`PrefixFeatures`, ``ObservationConfig.prefix_features``; on by
default when the replicas cache prefixes, off otherwise so the layouts above do not change):

==========================  =====================================================  ==========
feature                     meaning                                                unit
==========================  =====================================================  ==========
``r{i}/prefix_hit``         share of the pending prompt's tokens cached on replica  fraction
                            *i*, as the router estimates it from its own routing
                            history (:mod:`llm_cluster_env.routing.prefix_index`); the
                            true GPU + host-tier value with ``prefix_oracle``
``r{i}/prefix_index_fill``  blocks the router's index remembers for replica *i* /  fraction
                            the index capacity (SGLang's "tree size")
``r{i}/cache_usage``        KV blocks holding reusable cached content (in use or    fraction
                            evictable) / capacity, as engines report through KV
                            events
==========================  =====================================================  ==========

With both groups on, the engine model prices the pending prompt's prefill net of the cached
prefix the prefix group reports (estimated, or true with ``prefix_oracle``).

Per-replica features come first, replica-major (all of replica 0, then replica 1, ...).
``decode_tokens_k`` is exact with ``output_length_oracle=True``; otherwise it is the deployable
estimate ``max(0, active requests * mean output length - tokens already generated)``, using the
workload's mean output length as the prior. The reference batch for ``speed_k`` is 32 requests
with 1,024 context tokens each.

A heuristic router sees the same numbers through :class:`ClusterView`, which names the columns
of the per-replica block; ``ObservationLayout.view(obs)`` rebuilds that view from any flat
observation, so a heuristic acting on an agent's observation vector makes the same decision.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_env.config import ObservationConfig
from llm_cluster_env.routing.engine_model import (
    ENGINE_FEATURES,
    EngineModel,
    OutputLengthPrior,
    clock_and_boundary,
)
from llm_cluster_env.routing.prefix_index import ApproximatePrefixIndex

if TYPE_CHECKING:
    from llm_cluster_env.sim.replica import Replica
    from llm_cluster_env.sim.request import Request

REPLICA_FEATURES = (
    "queued",
    "running",
    "kv_usage",
    "prefill_tokens_k",
    "decode_tokens_k",
    "dispatch_share",
    "speed_k",
    "kv_capacity_k",
)
QUEUED, RUNNING, KV_USAGE, PREFILL_K, DECODE_K, SHARE, SPEED_K, KV_CAPACITY_K = range(
    len(REPLICA_FEATURES))
REFERENCE_BATCH = 32
REFERENCE_CONTEXT = 1024
#: The arrival-rate estimate looks at no less than this fraction of its time constant.
MIN_RATE_WINDOW_FRACTION = 0.1


class ObservationLayout:
    """Where each feature sits in the flat observation.

    :param num_replicas: number of replicas.
    :param config: observation options.
    """

    def __init__(self, num_replicas: int, config: ObservationConfig,
                 extra_replica_features: Sequence[str] = ()) -> None:
        slots = config.replica_slots or num_replicas
        if slots < num_replicas:
            raise ValueError(f"observation.replica_slots={slots}: fewer slots than the "
                             f"cluster's {num_replicas} replicas")
        self.num_replicas = num_replicas
        #: Replica slots in the observation (>= ``num_replicas``; the extra ones are zero).
        self.num_slots = slots
        self.padded = config.replica_slots is not None
        self.config = config
        #: Per-replica feature names in column order: :data:`REPLICA_FEATURES`, then the
        #: optional groups' (:func:`optional_replica_features`).
        self.replica_features: tuple[str, ...] = REPLICA_FEATURES + tuple(extra_replica_features)
        #: Column of each per-replica feature in ``ClusterView.replicas``.
        self.column: dict[str, int] = {f: i for i, f in enumerate(self.replica_features)}
        self.num_replica_features = len(self.replica_features)
        self.replica_block = slots * self.num_replica_features
        names = [f"r{i}/{f}" for i in range(slots) for f in self.replica_features]
        self.request_features: tuple[str, ...] = (
            ("req/prompt_tokens_k", "req/output_tokens_k") if config.output_length_oracle
            else ("req/prompt_tokens_k",))
        names += self.request_features
        names.append("global/arrival_rate")
        self.history_offset = len(names)
        names += [f"hist/t-{k + 1}/r{i}" for k in range(config.history_window)
                  for i in range(slots)]
        self.names: tuple[str, ...] = tuple(names)
        self.size = len(names)
        self.prompt_index = self.replica_block

    def schema(self) -> dict:
        """A JSON-able description, stored with checkpoints to detect mismatched envs."""
        return {
            "num_replicas": self.num_replicas,
            "replica_slots": self.num_slots,
            "replica_features": list(self.replica_features),
            "feature_names": list(self.names),
            "history_window": self.config.history_window,
            "output_length_oracle": self.config.output_length_oracle,
            **({"prefix_oracle": self.config.prefix_oracle}
               if "prefix_hit" in self.replica_features else {}),
        }

    def view(self, obs: np.ndarray, context: RoutingContext | None = None) -> ClusterView:
        """The named view of a flat observation (``obs`` is not copied), with the routing
        context when the caller has one (the env's ``view`` does)."""
        return ClusterView(np.asarray(obs), self, context)


@dataclass(frozen=True)
class RoutingContext:
    """What a router may read beside the observation vector, at one decision.

    Most routers decide from the observation alone (so they also act on a bare observation
    vector, as in demonstrations). Routers that follow a system with more information take it
    from here and say so in their docstring (``Router.requires_context``): e.g. a session key or
    the request's prompt block identities, or a simulation of replica state.

    :param request: the request being routed (its lengths and, with prefix caching, its prompt
        block identities); the simulator's object: read it, never modify it.
    :param replicas: the simulator's replicas, read-only by contract.
    :param now: the decision time (simulated seconds).
    :param output_prior: what the workload's length distribution says of output lengths
        (:class:`~llm_cluster_env.routing.engine_model.OutputLengthPrior`), which a deployed router can
        know from history.
    """

    request: Request | None
    replicas: Sequence[Replica]
    now: float
    output_prior: OutputLengthPrior | None = None


class ClusterView:
    """Named access to an observation: per-replica columns, the pending request, and (when the
    caller has one) the :class:`RoutingContext`."""

    __slots__ = ("obs", "layout", "replicas", "context")

    def __init__(self, obs: np.ndarray, layout: ObservationLayout,
                 context: RoutingContext | None = None) -> None:
        self.obs = obs
        self.layout = layout
        self.context = context
        block = obs[: layout.replica_block].reshape(layout.num_slots, layout.num_replica_features)
        if layout.padded:  # the replicas present are the leading slots (speed_k > 0)
            block = block[: int(np.count_nonzero(block[:, SPEED_K]))]
        #: One row per replica present, columns ``layout.replica_features``.
        self.replicas = block

    @property
    def num_replicas(self) -> int:
        """Replicas present (in a padded observation, fewer than its slots)."""
        return len(self.replicas)

    def column(self, feature: str) -> np.ndarray:
        """The per-replica column of ``feature`` (a name in ``layout.replica_features``)."""
        try:
            return self.replicas[:, self.layout.column[feature]]
        except KeyError:
            raise KeyError(f"feature {feature!r} is not in this observation (per-replica "
                           f"features: {', '.join(self.layout.replica_features)})") from None

    @property
    def queued(self) -> np.ndarray:
        return self.replicas[:, QUEUED]

    @property
    def running(self) -> np.ndarray:
        return self.replicas[:, RUNNING]

    @property
    def outstanding_requests(self) -> np.ndarray:
        return self.replicas[:, QUEUED] + self.replicas[:, RUNNING]

    @property
    def kv_usage(self) -> np.ndarray:
        return self.replicas[:, KV_USAGE]

    @property
    def outstanding_tokens_k(self) -> np.ndarray:
        """Work left: prefill plus (estimated) decode tokens, thousands."""
        return self.replicas[:, PREFILL_K] + self.replicas[:, DECODE_K]

    @property
    def dispatch_share(self) -> np.ndarray:
        return self.replicas[:, SHARE]

    @property
    def speed_k(self) -> np.ndarray:
        return self.replicas[:, SPEED_K]

    @property
    def kv_capacity_k(self) -> np.ndarray:
        return self.replicas[:, KV_CAPACITY_K]

    @property
    def prompt_tokens_k(self) -> float:
        return float(self.obs[self.layout.prompt_index])


class ObservationBuilder:
    """Encodes the cluster at a decision point into the flat observation.

    :param layout: the feature layout.
    :param replicas: the simulator's replicas (read-only use).
    :param mean_output_tokens: prior for a request's output length (tokens), used by the
        deployable ``decode_tokens_k`` estimate.
    :param groups: optional per-replica feature groups, in the order their names appear in
        ``layout.replica_features`` after the base ones.
    """

    def __init__(self, layout: ObservationLayout, replicas: Sequence, mean_output_tokens: float,
                 groups: Sequence[ReplicaFeatureGroup] = ()) -> None:
        names = tuple(name for group in groups for name in group.names)
        if layout.replica_features[len(REPLICA_FEATURES):] != names:
            raise ValueError(f"the layout's optional per-replica features "
                             f"{layout.replica_features[len(REPLICA_FEATURES):]} differ from the "
                             f"groups' {names}")
        self.layout = layout
        self.replicas = list(replicas)
        self.groups = tuple(groups)
        self._boundaries = any(group.needs_boundaries for group in self.groups)
        self.mean_output_tokens = float(mean_output_tokens)
        self.oracle = layout.config.output_length_oracle
        self._tau = layout.config.arrival_rate_timescale_s
        self._share_window = layout.config.dispatch_share_window
        self._static = [
            (reference_decode_throughput(r.latency) / 1000.0,
             r.num_blocks * r.block_size / 1000.0)
            for r in self.replicas
        ]
        self.reset()

    def reset(self) -> None:
        """Forget dispatch history and arrival-rate state (start of an episode)."""
        n = self.layout.num_replicas
        self._recent: deque[int] = deque()
        self._recent_counts = [0] * n
        self._history: deque[int] = deque(maxlen=max(self.layout.config.history_window, 1))
        self._decayed_arrivals = 0.0
        self._first_arrival: float | None = None
        self._last_arrival = 0.0
        for group in self.groups:
            group.reset()

    def record_arrival(self, t: float) -> None:
        """Update the arrival-rate estimate with an arrival at ``t`` (seconds)."""
        if self._first_arrival is None:
            self._first_arrival = t
        else:
            self._decayed_arrivals *= math.exp(-(t - self._last_arrival) / self._tau)
        self._decayed_arrivals += 1.0
        self._last_arrival = t

    def record_dispatch(self, replica_id: int, request: Request | None = None) -> None:
        """Update dispatch shares, the decision history and the feature groups' state with the
        dispatch of ``request`` to ``replica_id``."""
        for group in self.groups:
            group.record_dispatch(replica_id, request)
        self._recent.append(replica_id)
        self._recent_counts[replica_id] += 1
        if len(self._recent) > self._share_window:
            self._recent_counts[self._recent.popleft()] -= 1
        if self.layout.config.history_window:
            self._history.appendleft(replica_id)

    def arrival_rate(self) -> float:
        """Arrival-rate estimate (requests/s) as of the last recorded arrival: the decayed
        arrival count over the decayed length of the time observed, that time taken as at
        least ``MIN_RATE_WINDOW_FRACTION * arrival_rate_timescale_s`` (1 s by default), so a
        burst of near-simultaneous arrivals (gamma gaps with a large CV draw gaps of 1e-300 s)
        reads as a high but finite rate."""
        if self._first_arrival is None:
            return 0.0
        elapsed = self._last_arrival - self._first_arrival
        if elapsed <= 0.0 and self._decayed_arrivals <= 1.0:
            return 0.0  # one arrival: no rate yet
        window = max(elapsed, MIN_RATE_WINDOW_FRACTION * self._tau)
        return self._decayed_arrivals / (self._tau * -math.expm1(-window / self._tau))

    @property
    def recent_counts(self) -> list[int]:
        """Dispatches per replica over the recent window (the builder's own list: do not modify)."""
        return self._recent_counts

    def build(self, now: float, prompt_tokens: int, output_tokens: int,
              request: Request | None = None) -> np.ndarray:
        """The observation at ``now`` for a request with these lengths (tokens; 0 = none); the
        feature groups also see the ``request`` itself."""
        values: list[float] = []
        extend = values.extend
        replicas = self.replicas
        if self._boundaries:
            timings = [clock_and_boundary(rep, now) for rep in replicas]
            clocks = [t[0] for t in timings]
            boundaries = [t[1] for t in timings]
        else:
            clocks = [rep.clock_at(now) if rep.busy else rep.clock for rep in replicas]
            boundaries = None
        used = [rep.blocks_in_use(clock) for rep, clock in zip(replicas, clocks)]
        extra = None
        for group in self.groups:
            columns = group.columns(now, request, clocks, used, boundaries)
            extra = columns if extra is None else [tuple(a) + tuple(b)
                                                   for a, b in zip(extra, columns)]
        share_den = max(len(self._recent), 1)
        mean_out = self.mean_output_tokens
        oracle = self.oracle
        counts = self._recent_counts
        for rep, (speed_k, capacity_k), clock, in_use in zip(replicas, self._static, clocks, used):
            queued = len(rep.waiting)
            running = len(rep.running)
            generated = rep.generated_tokens_active(clock)
            if oracle:
                decode = rep.active_output_tokens - generated
            else:
                decode = (queued + running) * mean_out - generated
                if decode < 0.0:
                    decode = 0.0
            extend((
                queued,
                running,
                in_use / rep.num_blocks,
                rep.pending_prefill_tokens * 0.001,
                decode * 0.001,
                counts[rep.id] / share_den,
                speed_k,
                capacity_k,
            ))
            if extra is not None:
                extend(extra[rep.id])
        layout = self.layout
        obs = np.zeros(layout.size, dtype=np.float32)
        obs[: len(values)] = values
        tail = [prompt_tokens * 0.001]
        if oracle:
            tail.append(output_tokens * 0.001)
        tail.append(self.arrival_rate())
        base = layout.replica_block
        obs[base: base + len(tail)] = tail
        if layout.config.history_window:
            base = layout.history_offset
            n = layout.num_slots
            for k, replica_id in enumerate(self._history):
                obs[base + k * n + replica_id] = 1.0
        return obs


class ReplicaFeatureGroup:
    """A group of optional per-replica features (appended after the base features of each
    replica, in :attr:`names` order). Subclasses keep whatever state they need across an
    episode and compute their columns from the replicas at each decision."""

    #: Feature names (without the ``r{i}/`` prefix).
    names: tuple[str, ...] = ()
    #: Whether :meth:`columns` needs each replica's time to its next iteration boundary.
    needs_boundaries = False

    def reset(self) -> None:
        """Forget episode state (start of an episode)."""

    def record_dispatch(self, replica_id: int, request: Request | None) -> None:
        """The router sent ``request`` to ``replica_id``."""

    def columns(self, now: float, request: Request | None, clocks: Sequence[int],
                used: Sequence[int], boundaries: Sequence[float] | None
                ) -> list[Sequence[float]]:
        """Per replica, the group's values at ``now`` for the pending ``request``. The builder
        computes once what several features need: ``clocks``, the replicas' iteration clocks
        at ``now`` (``Replica.clock_at``), ``used``, their KV blocks in use then
        (``Replica.blocks_in_use``, the ``kv_usage`` numerator), and, when some group
        ``needs_boundaries``, the seconds from ``now`` to each one's next iteration boundary
        (else ``None``)."""
        raise NotImplementedError


class PrefixFeatures(ReplicaFeatureGroup):
    """``prefix_hit``, ``prefix_index_fill``, ``cache_usage`` (see the module table).

    :param replicas: the simulator's replicas (read-only use; the true cached prefix and the
        cache usage are read from their prefix caches).
    :param oracle: ``prefix_hit`` is the true cached share instead of the router's estimate.
    :param index_blocks: capacity of the router-side index per replica (blocks); ``None`` = the
        replica's KV capacity plus its host tier.
    """

    names = ("prefix_hit", "prefix_index_fill", "cache_usage")

    def __init__(self, replicas: Sequence[Replica], oracle: bool = False,
                 index_blocks: int | None = None) -> None:
        self.replicas = list(replicas)
        self.oracle = oracle
        self.indexes = []
        for rep in self.replicas:
            capacity = index_blocks
            if capacity is None:
                capacity = rep.num_blocks
                if rep.cache is not None and rep.cache.host is not None:
                    capacity += rep.cache.host.capacity_blocks
            self.indexes.append(ApproximatePrefixIndex(capacity))
        self.last_hits: list[float] | None = None  # prefix_hit per replica, last decision

    def reset(self) -> None:
        for index in self.indexes:
            index.reset()

    def record_dispatch(self, replica_id: int, request: Request | None) -> None:
        chain = request.chain if request is not None else None
        if chain is not None:
            bs = self.replicas[replica_id].block_size
            self.indexes[replica_id].insert(chain.ids, chain.block_starts(bs),
                                            request.prompt_tokens // bs)

    def columns(self, now: float, request: Request | None, clocks: Sequence[int],
                used: Sequence[int], boundaries: Sequence[float] | None
                ) -> list[Sequence[float]]:
        chain = request.chain if request is not None else None
        prompt = request.prompt_tokens if request is not None else 0
        out = []
        bs = starts = first = None
        oracle = self.oracle
        for rep, index, in_use in zip(self.replicas, self.indexes, used):
            hit = 0.0
            if chain is not None:
                if oracle:
                    hit = rep.cached_prefix_tokens(chain, prompt, now) / prompt
                else:
                    if rep.block_size != bs:
                        bs = rep.block_size
                        starts = chain.block_starts(bs)
                        first = chain.ids[0] if starts[0] < (starts[1:] or (1,))[0] else None
                    if first is None or first in index.lengths:  # else nothing matches
                        hit = index.match(chain.ids, starts, prompt // bs) * bs / prompt
            cache = rep.cache
            num_blocks = rep.num_blocks
            if cache is None:
                usage = 0.0
            else:  # cached blocks once the allocations so far have evicted what is due
                evictable = cache.evictable.count - cache.due
                free = num_blocks - in_use
                usage = (cache.held_distinct + (evictable if evictable < free else free)) \
                    / num_blocks
            out.append((hit, index.lru.count / index.capacity_blocks, usage))
        self.last_hits = [row[0] for row in out]
        return out


class EngineFeatures(ReplicaFeatureGroup):
    """``est_wait_s``, ``est_ttft_s``, ``est_delta_s`` (see the module table and
    :mod:`llm_cluster_env.routing.engine_model`); zeros when no request is pending.

    :param replicas: the simulator's replicas (read-only use).
    :param model: the engine model (its output-length prior, or the oracle).
    :param prefix: the prefix group, whose ``prefix_hit`` of this decision discounts the
        prompt's prefill (built before this group); ``None`` without prefix features.
    """

    names = ENGINE_FEATURES
    needs_boundaries = True

    def __init__(self, replicas: Sequence[Replica], model: EngineModel,
                 prefix: PrefixFeatures | None = None) -> None:
        self.replicas = list(replicas)
        self.model = model
        self.prefix = prefix
        self._zeros = [(0.0, 0.0, 0.0)] * len(self.replicas)

    def columns(self, now: float, request: Request | None, clocks: Sequence[int],
                used: Sequence[int], boundaries: Sequence[float] | None
                ) -> list[Sequence[float]]:
        if request is None:
            return self._zeros
        estimate = self.model.estimate
        prompt, output = request.prompt_tokens, request.output_tokens
        hits = self.prefix.last_hits if self.prefix is not None else None
        out = []
        for i, rep in enumerate(self.replicas):
            cached = int(hits[i] * prompt) if hits is not None else 0
            out.append(estimate(rep, now, prompt, output, cached,
                                timing=(clocks[i], boundaries[i])))
        return out


def optional_replica_features(config: ObservationConfig, caches_prefixes: bool
                              ) -> tuple[str, ...]:
    """Names of the optional per-replica features ``config`` switches on, in layout order, for
    a cluster whose replicas do (or do not) cache prefixes."""
    prefix = config.prefix_features if config.prefix_features is not None else caches_prefixes
    return ((PrefixFeatures.names if prefix else ())
            + (EngineFeatures.names if config.engine_signals else ()))


def reference_decode_throughput(latency) -> float:
    """Decode tokens per second of a replica at the reference batch (32 requests, 1k context)."""
    seconds = latency.iteration_time(REFERENCE_BATCH, REFERENCE_BATCH * REFERENCE_CONTEXT)
    return REFERENCE_BATCH / seconds
