"""Heuristic routers behind one interface: ``select(view) -> replica index``.

Every router decides from a :class:`~llm_cluster_env.env.observation.ClusterView` (the named view
of the environment's own observation vector), so heuristics, demonstrations and learned agents
see exactly the same state. Randomised routers, and ``lor``'s tie-breaking, draw only from the
generator given to :meth:`Router.reset`, so every router is deterministic given its seed.

Ties (the ``ties`` column): *lowest* = the lowest replica index among the equally good ones;
*random* = uniform among them from the router's generator. :meth:`Router.tied_choices` returns
all of them either way (behaviour cloning scores agreement up to ties).

======================  ============  ==========================================================
name                    ties          rule
======================  ============  ==========================================================
``round_robin``         (none)        replicas in turn
``random``              (none)        uniform at random
``lor``                 random        least outstanding requests (queued + running)
``lor_waiting``         lowest        fewest *queued* requests only (Vidur's ``lor``); piles onto
                                      replica 0 while its queue stays empty (see the class)
``power_of_two``        random        two replicas at random, the one with fewer outstanding
                                      requests; the first drawn on a tie (Ray Serve, SGLang)
``least_kv``            lowest        lowest KV-cache usage, then fewest outstanding requests
                                      (AIBrix ``least-kv-cache``)
``least_tokens``        lowest        least outstanding tokens: prefill + (estimated) decode work
``llm_d``               lowest        llm-d's default scorer blend: queue depth and KV usage, each
                                      min-max scaled across replicas, equal weights
``least_work_time``     lowest        outstanding tokens plus this prompt, divided by the
                                      replica's decode throughput: the estimated drain time,
                                      aware of heterogeneous hardware
``weighted_lor``        lowest        Envoy's weighted LEAST_REQUEST: the highest ``weight /
                                      (outstanding + 1) ** bias`` with the replica's decode
                                      throughput as its weight (bias 1)
``least_added_time``    lowest        the engine model's smallest estimated increase in total
                                      time in system (``est_delta_s``: the request's own
                                      latency plus the slow-down it causes;
                                      :mod:`llm_cluster_env.routing.engine_model`)
``least_ttft``          lowest        the engine model's smallest estimated time to first token
                                      (``est_ttft_s``: prefill queue ahead plus the uncached
                                      prefill) + 0.1 x ``est_delta_s`` + 4 s x the
                                      KV-cache usage (the others' delay, decode load)
``lookahead``           lowest        a baseline, not a heuristic: simulates a copy of every
                                      replica to empty with and without the request and picks the
                                      least added total time in system (needs the routing context;
                                      :mod:`llm_cluster_env.routing.lookahead`)
======================  ============  ==========================================================

Prefix-cache-aware routers (each docstring names the system it follows and the source of its
defaults). They read the observation's prefix features, on when the replicas cache prefixes;
without them nothing counts as cached and they route by load alone. ``dynamo_kv`` (with KV
events) and ``session_affinity`` also read the routing context, so they cannot act on a bare
observation vector:

======================  ========  =========================================================
name                    ties      rule
======================  ========  =========================================================
``sglang_cache_aware``  load,     SGLang router ``cache_aware``: shortest queue when the
                        lowest    load is imbalanced, else the best estimated prefix match
                                  above ``cache_threshold``, else the smallest index
``llm_d_prefix``        random    llm-d's default profile: ``2 x queue + 2 x KV-cache
                                  utilisation + 3 x prefix-cache`` scores, highest wins
``dynamo_kv``           index,    NVIDIA Dynamo KV router: least ``overlap_score_weight x
                        random    prefill blocks + decode blocks``, exact cached prefixes
                                  from KV events (the routing context), softmax sampling
                                  with ``temperature > 0``
``session_affinity``    (none)    vLLM production-stack ``session`` routing: consistent
                                  hashing of the request's session key (routing context);
                                  no key: the replica with the least recent dispatch share
======================  ========  =========================================================
"""

from __future__ import annotations

import bisect
import hashlib
from types import MappingProxyType

import numpy as np

from llm_cluster_env.env.observation import PREFILL_K, ClusterView
from llm_cluster_env.routing.base import Router, ScoredRouter, _all_min, build_router
from llm_cluster_env.routing.lookahead import LookaheadRouter


class RoundRobinRouter(Router):
    name = "round_robin"
    reads = ()

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        super().reset(num_replicas, rng)
        self._next = 0

    def select(self, view: ClusterView) -> int:
        choice = self._next
        self._next = (choice + 1) % self.num_replicas
        return choice


class RandomRouter(Router):
    name = "random"
    reads = ()

    def select(self, view: ClusterView) -> int:
        return int(self.rng.integers(self.num_replicas))


def _column_or_zero(view: ClusterView, feature: str) -> np.ndarray:
    """The per-replica column of an optional feature as float64, zeros when the observation
    does not have it (the prefix features without prefix caching: nothing is cached)."""
    if feature in view.layout.column:
        return view.column(feature).astype(np.float64)
    return np.zeros(view.num_replicas)


class LeastOutstandingRequestsRouter(ScoredRouter):
    """Fewest outstanding requests (queued + running); ties uniformly at random.

    The random tie-break matters on an idle or evenly loaded cluster, where several replicas
    often tie: the lowest index would favour replica 0.
    """

    name = "lor"
    ties = "random"
    reads = ("queued", "running")

    def cost(self, view: ClusterView) -> np.ndarray:
        return view.outstanding_requests


class LeastWaitingRequestsRouter(ScoredRouter):
    """Fewest *waiting* (queued, not yet admitted) requests; ties to the lowest replica index.

    This is Vidur's ``lor`` global scheduler, which counts only each replica's pending queue.
    Running requests are invisible to it, and that fails in a realistic way at moderate load: a
    replica with free batch slots and KV blocks admits a new request at its next iteration, so
    its queue is empty at most decisions, all queues tie at zero and the tie goes to replica 0.
    Replica 0 takes nearly all the traffic while its batch grows and its iterations slow down;
    only the requests that arrive while a request already waits for its next iteration spill
    over to replica 1, then 2, and so on. Measured on ``a100x4_conv_70`` (3 seeds, 2,000
    requests): at 2 req/s replica 0 gets ~97 % of the requests, at 5 req/s ~84 %, at the
    scenario's 13.9 req/s (70 % load) the shares are ~0.38/0.36/0.20/0.06 with a mean batch of
    ~80 on replica 0 (~17 with ``lor``) and a mean E2E latency ~2.3x ``lor``'s. A learned
    router should beat it easily; ``lor`` (queued + running) does not have this failure.
    """

    name = "lor_waiting"
    reads = ("queued",)

    def cost(self, view: ClusterView) -> np.ndarray:
        return view.queued


class PowerOfTwoRouter(Router):
    name = "power_of_two"
    reads = ("queued", "running")

    def select(self, view: ClusterView) -> int:
        if self.num_replicas == 1:
            return 0
        a, b = self.rng.choice(self.num_replicas, size=2, replace=False)
        load = view.outstanding_requests
        return int(b) if load[b] < load[a] else int(a)


class LeastKVRouter(Router):
    """Lowest KV-cache usage, then fewest outstanding requests (AIBrix ``least-kv-cache``);
    remaining ties to the lowest replica index."""

    name = "least_kv"
    reads = ("queued", "running", "kv_usage")

    def select(self, view: ClusterView) -> int:
        return int(self.tied_choices(view)[0])

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        candidates = _all_min(view.kv_usage)
        return candidates[_all_min(view.outstanding_requests[candidates])]


class LeastOutstandingTokensRouter(ScoredRouter):
    name = "least_tokens"
    reads = ("prefill_tokens_k", "decode_tokens_k")

    def cost(self, view: ClusterView) -> np.ndarray:
        return view.outstanding_tokens_k


def _min_max_scaled(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


class LLMDRouter(ScoredRouter):
    """llm-d inference-scheduler style: weighted sum of normalised queue and KV scores."""

    name = "llm_d"
    reads = ("queued", "running", "kv_usage")

    def __init__(self, queue_weight: float = 1.0, kv_weight: float = 1.0) -> None:
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight

    def cost(self, view: ClusterView) -> np.ndarray:
        return (self.queue_weight * _min_max_scaled(view.outstanding_requests.astype(np.float64))
                + self.kv_weight * _min_max_scaled(view.kv_usage.astype(np.float64)))


class LeastWorkTimeRouter(ScoredRouter):
    name = "least_work_time"
    reads = ("prefill_tokens_k", "decode_tokens_k", "speed_k")

    def cost(self, view: ClusterView) -> np.ndarray:
        return (view.outstanding_tokens_k + view.prompt_tokens_k) / view.speed_k


class WeightedLeastRequestRouter(ScoredRouter):
    """Envoy-style weighted least request, weights = decode throughput (``speed_k``)."""

    name = "weighted_lor"
    reads = ("queued", "running", "speed_k")

    def __init__(self, bias: float = 1.0) -> None:
        self.bias = bias

    def cost(self, view: ClusterView) -> np.ndarray:
        return (view.outstanding_requests + 1.0) ** self.bias / view.speed_k


class LeastAddedTimeRouter(ScoredRouter):
    """The replica where the engine model estimates the request adds the least total time in
    system (``est_delta_s``, seconds); needs ``observation.engine_signals`` (the default). Like
    llm-d's latency-predictor scorer, it prices requests with a model of the engine instead of
    counting them. Greedy: it ignores requests that have not arrived yet."""

    name = "least_added_time"
    reads = ("est_delta_s",)

    def cost(self, view: ClusterView) -> np.ndarray:
        return view.column("est_delta_s")


class LeastTTFTRouter(ScoredRouter):
    """The replica where the engine model estimates the request's own time to first token is
    least (``est_ttft_s``, seconds: the prefill queue ahead of it plus its uncached prefill,
    prefix hits included); needs ``observation.engine_signals``. Greedy, like
    ``least_added_time``; routing on predicted TTFT is what llm-d's latency-predictor scorer
    does for first tokens.

    Two terms price what the request does to the others:

    :param delta_weight: seconds of cost per second of the estimated added time in system
        (``est_delta_s``), finite, >= 0.
    :param kv_weight: seconds of cost per unit of KV-cache usage (``kv_usage``, 0-1), finite,
        >= 0: a decode-load term like NVIDIA Dynamo's decode blocks, which keeps new work off
        replicas whose cache is full of running decodes (it protects the p99 E2E).

    The defaults (``kv_weight`` 4 s, ``delta_weight`` 0.1) were chosen on the Mooncake trace's
    *training* rows (0-8,399; 8x A100, 20 windows x 1,000 requests at 80% and 90% load) as the
    setting with the highest goodput at 90% whose p99 E2E stayed within +2% of ``dynamo_kv``
    at both loads; without either term (weights 0, 0) p99 E2E was +7.3% at 80%
    (``docs/prefix_headroom.md`` has the sweep).
    """

    name = "least_ttft"
    reads = ("est_ttft_s", "est_delta_s", "kv_usage")

    def __init__(self, delta_weight: float = 0.1, kv_weight: float = 4.0) -> None:
        for key, value in (("delta_weight", delta_weight), ("kv_weight", kv_weight)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"least_ttft.{key}={value!r}: must be a finite number >= 0")
        self.delta_weight = float(delta_weight)
        self.kv_weight = float(kv_weight)

    def cost(self, view: ClusterView) -> np.ndarray:
        cost = view.column("est_ttft_s").astype(np.float64)
        if self.delta_weight:
            cost = cost + self.delta_weight * view.column("est_delta_s")
        if self.kv_weight:
            cost = cost + self.kv_weight * view.kv_usage.astype(np.float64)
        return cost


class SGLangCacheAwareRouter(Router):
    """SGLang router's ``cache_aware`` policy (``sgl-router``, ``policies/cache_aware.rs``).

    SGLang keeps an approximate radix tree per worker from its own routing history (every
    request's prompt inserted under the worker chosen, least recently used leaves evicted
    beyond ``max_tree_size``); here that is the observation's router-side index
    (``prefix_hit`` is the match rate, ``prefix_index_fill`` the tree size; see
    :mod:`llm_cluster_env.routing.prefix_index`). The load of a worker is its requests in flight
    (queued + running). Each request:

    1. if the load is *imbalanced*, ``max - min > balance_abs_threshold`` **and**
       ``max > balance_rel_threshold * min``: the least loaded replica (lowest index on ties);
    2. otherwise, if the best match rate exceeds ``cache_threshold``: the replica with it
       (ties: least loaded, then lowest index);
    3. otherwise the replica with the smallest tree, "the most available cache" (ties: least
       loaded, then lowest index).

    Defaults are the router's published defaults (``sglang_router`` ``RouterArgs``:
    ``cache_threshold=0.3``, ``balance_abs_threshold=64``, ``balance_rel_threshold=1.5``;
    ``max_tree_size=2**26`` characters with eviction every 120 s there, the observation's
    ``prefix_index_blocks`` here). With a handful of replicas and tens of requests each, a
    64-request imbalance rarely happens: this policy then follows the cache.

    :param cache_threshold: minimum match rate (fraction of the prompt) for cache affinity.
    :param balance_abs_threshold: load difference (requests) that may count as imbalance.
    :param balance_rel_threshold: load ratio that may count as imbalance.
    """

    name = "sglang_cache_aware"
    reads = ("queued", "running")
    reads_if_present = ("prefix_hit", "prefix_index_fill")

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: float = 64,
                 balance_rel_threshold: float = 1.5) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def select(self, view: ClusterView) -> int:
        return int(self.tied_choices(view)[0])

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        load = view.outstanding_requests.astype(np.float64)
        high, low = load.max(), load.min()
        if high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low:
            return _all_min(load)
        hit = _column_or_zero(view, "prefix_hit")
        if hit.max() > self.cache_threshold:
            candidates = np.flatnonzero(hit == hit.max())
        else:
            candidates = _all_min(_column_or_zero(view, "prefix_index_fill"))
        return candidates[_all_min(load[candidates])]

    def __repr__(self) -> str:
        return (f"SGLangCacheAwareRouter(cache_threshold={self.cache_threshold}, "
                f"balance_abs_threshold={self.balance_abs_threshold}, "
                f"balance_rel_threshold={self.balance_rel_threshold})")


class LLMDPrefixRouter(ScoredRouter):
    """llm-d inference scheduler, default scheduling profile (``llm-d-inference-scheduler``
    ``default-plugins.yaml``): the replica with the highest weighted sum of three scorers,
    ties uniformly at random (the max-score picker shuffles before picking).

    * ``queue-scorer`` (weight ``queue_weight``, default 2): waiting requests, min-max scaled
      to ``(max - q) / (max - min)`` (1 on every replica when all are equal);
    * ``kv-cache-utilization-scorer`` (weight ``kv_weight``, default 2): ``1 - KV usage``;
    * ``prefix-cache-scorer`` (weight ``prefix_weight``, default 3): the share of the prompt's
      blocks the scheduler's approximate prefix index holds for the replica (the
      observation's ``prefix_hit``; llm-d sizes that index from the engines' block counts,
      31,250 blocks per server by default).

    :param queue_weight: weight of the queue score.
    :param kv_weight: weight of the KV-cache utilisation score.
    :param prefix_weight: weight of the prefix-cache score.
    """

    name = "llm_d_prefix"
    ties = "random"
    reads = ("queued", "kv_usage")
    reads_if_present = ("prefix_hit",)

    def __init__(self, queue_weight: float = 2.0, kv_weight: float = 2.0,
                 prefix_weight: float = 3.0) -> None:
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.prefix_weight = prefix_weight

    def cost(self, view: ClusterView) -> np.ndarray:
        queued = view.queued.astype(np.float64)
        span = queued.max() - queued.min()
        queue_score = (queued.max() - queued) / span if span > 0 else np.ones_like(queued)
        score = (self.queue_weight * queue_score
                 + self.kv_weight * (1.0 - view.kv_usage.astype(np.float64))
                 + self.prefix_weight * _column_or_zero(view, "prefix_hit"))
        return -score


class DynamoKVRouter(Router):
    """NVIDIA Dynamo's KV router (``lib/kv-router``, ``DefaultWorkerSelector``).

    Per replica the cost (logit) ``overlap_score_weight * prefill_blocks + decode_blocks``,
    lowest wins:

    * ``prefill_blocks``: the prefill tokens the replica would have with this request, its
      outstanding prefill plus the prompt tokens it does not have cached, over
      ``block_size``;
    * ``decode_blocks``: the KV blocks the replica has in use plus the request's blocks.

    With KV events (``kv_events=True``, Dynamo's default) the router knows exactly which
    blocks each engine caches: the cached prefix is read from the replicas through the
    routing context (``requires_context``). With ``kv_events=False`` (Dynamo's
    ``--no-kv-events``) it uses its own routing-history estimate, the observation's
    ``prefix_hit``, and acts on bare observations. ``temperature = 0`` (default) takes the
    least cost, ties to the smallest index (Dynamo breaks ties by tree size), then at random;
    ``temperature > 0`` samples ``softmax(-cost / (max - min) / temperature)`` as Dynamo does.
    Defaults are Dynamo's: ``overlap_score_weight=1.0``, ``router_temperature=0.0``.

    :param overlap_score_weight: weight of the prefill cost against the decode load.
    :param temperature: softmax temperature (0 = deterministic).
    :param kv_events: read exact cached prefixes (True) or use the estimate (False).
    :param block_size: KV block size the costs are counted in (tokens).
    """

    name = "dynamo_kv"
    reads = ("prefill_tokens_k", "kv_usage", "kv_capacity_k")
    reads_if_present = ("prefix_hit", "prefix_index_fill")
    requires_context = True  # with the default kv_events=True

    def __init__(self, overlap_score_weight: float = 1.0, temperature: float = 0.0,
                 kv_events: bool = True, block_size: int = 16) -> None:
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0")
        self.overlap_score_weight = overlap_score_weight
        self.temperature = temperature
        self.kv_events = kv_events
        self.requires_context = kv_events
        self.block_size = block_size

    def cost(self, view: ClusterView) -> np.ndarray:
        """The Dynamo logit of each replica (lower is better)."""
        prompt = float(round(view.prompt_tokens_k * 1000.0))  # whole tokens
        if self.kv_events:
            ctx = self.context(view)
            request = ctx.request
            cached = np.array([rep.cached_prefix_tokens(request.chain, request.prompt_tokens,
                                                        ctx.now) for rep in ctx.replicas],
                              dtype=np.float64)
        else:
            cached = _column_or_zero(view, "prefix_hit") * prompt
        bs = self.block_size
        prefill = (view.replicas[:, PREFILL_K].astype(np.float64) * 1000.0 + prompt - cached) / bs
        capacity = view.kv_capacity_k.astype(np.float64) * 1000.0 / bs
        decode = view.kv_usage.astype(np.float64) * capacity + np.ceil(prompt / bs)
        return self.overlap_score_weight * prefill + decode

    def select(self, view: ClusterView) -> int:
        costs = self.cost(view)
        if self.temperature > 0:
            span = costs.max() - costs.min()
            if span <= 0:
                return int(self.rng.integers(len(costs)))
            logits = -(costs / span) / self.temperature
            p = np.exp(logits - logits.max())
            return int(np.searchsorted(np.cumsum(p / p.sum()), self.rng.random(), side="right")
                       .clip(0, len(costs) - 1))
        tied = self._ties(view, costs)
        return int(tied[0]) if len(tied) == 1 else int(tied[int(self.rng.random() * len(tied))])

    def _ties(self, view: ClusterView, costs: np.ndarray) -> np.ndarray:
        tied = _all_min(costs)
        if len(tied) > 1:
            tied = tied[_all_min(_column_or_zero(view, "prefix_index_fill")[tied])]
        return tied

    def tied_choices(self, view: ClusterView) -> np.ndarray | None:
        if self.temperature > 0:
            return None
        return self._ties(view, self.cost(view))

    def __repr__(self) -> str:
        return (f"DynamoKVRouter(overlap_score_weight={self.overlap_score_weight}, "
                f"temperature={self.temperature}, kv_events={self.kv_events})")


class SessionAffinityRouter(Router):
    """vLLM production-stack's ``session`` routing logic (``vllm_router``
    ``routing_logic.SessionRouter``): the request's session key is hashed onto a consistent
    hash ring of the replicas, so a session stays on one replica (and finds its history in
    that replica's prefix cache) while adding or removing a replica moves only ~1/N of the
    sessions. The ring follows ``uhashring``'s default, which that router uses: ``vnodes=160``
    points per replica, MD5 positions. A request without a session key goes to the replica
    with the least recent dispatch share (production-stack: the lowest QPS).

    The session key is what a real router reads from a header (``x-session-id``), so it comes
    from the routing context (``requires_context``): the request's
    :attr:`~llm_cluster_env.prefix_chain.PrefixChain.session_key` (a conversation, a
    tenant, or for the Mooncake trace its first two blocks).

    :param vnodes: ring points per replica.
    """

    name = "session_affinity"
    reads = ("dispatch_share",)
    requires_context = True

    def __init__(self, vnodes: int = 160) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes={vnodes}: must be >= 1")
        self.vnodes = vnodes

    @staticmethod
    def _position(text: str) -> int:
        return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big")

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        super().reset(num_replicas, rng)
        points = sorted((self._position(f"replica-{r}-{v}"), r)
                        for r in range(num_replicas) for v in range(self.vnodes))
        self._ring_keys = [p for p, _ in points]
        self._ring_replicas = [r for _, r in points]
        self._memo: dict[int, int] = {}

    def replica_of(self, session_key: int) -> int:
        """The replica the ring assigns to ``session_key``."""
        replica = self._memo.get(session_key)
        if replica is None:
            i = bisect.bisect(self._ring_keys, self._position(f"session-{session_key}"))
            replica = self._ring_replicas[i % len(self._ring_keys)]
            self._memo[session_key] = replica
        return replica

    def select(self, view: ClusterView) -> int:
        request = self.context(view).request
        chain = request.chain if request is not None else None
        if chain is None or chain.session_key < 0:
            return int(_all_min(view.dispatch_share)[0])
        return self.replica_of(chain.session_key)

    def __repr__(self) -> str:
        return f"SessionAffinityRouter(vnodes={self.vnodes})"


ROUTERS: MappingProxyType[str, type[Router]] = MappingProxyType({
    cls.name: cls
    for cls in (RoundRobinRouter, RandomRouter, LeastOutstandingRequestsRouter,
                LeastWaitingRequestsRouter, PowerOfTwoRouter, LeastKVRouter,
                LeastOutstandingTokensRouter, LLMDRouter, LeastWorkTimeRouter,
                WeightedLeastRequestRouter, LeastAddedTimeRouter, LeastTTFTRouter,
                SGLangCacheAwareRouter,
                LLMDPrefixRouter, DynamoKVRouter, SessionAffinityRouter, LookaheadRouter)
})

#: The prefix-cache-aware routers (they matter on workloads whose prompts share prefixes).
CACHE_AWARE_ROUTERS = ("sglang_cache_aware", "llm_d_prefix", "dynamo_kv", "session_affinity")


def make_router(name: str, **kwargs) -> Router:
    """A router by name (see the table above); ``ValueError`` lists the names on a miss."""
    return build_router(ROUTERS, name, **kwargs)
