"""The cluster's event loop: replicas, one event heap, and the routing seam.

Usage, one episode::

    cluster.reset(requests)                     # time-ordered Request objects
    while (request := cluster.next_arrival()) is not None:
        cluster.dispatch(request, router(...))  # the decision point
    cluster.drain()                             # run until every request has finished

``next_arrival`` processes every replica event ordered before the arrival (see
:mod:`llm_cluster_env.sim.events` for the tie-break order) and stops at the arrival's time, so
the caller sees the cluster exactly as it is when the request reaches the router.

The cluster also integrates the number of requests in the system over time (``area``, in
request-seconds). Between two decisions it grows by the time those requests spent in the
system, so its total over an episode is the sum of all end-to-end latencies: the default reward.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from heapq import heappop, heappush
from typing import TYPE_CHECKING

from llm_cluster_env.sim.events import ARRIVAL, BATCH_END, BATCH_START
from llm_cluster_env.sim.latency import IterationTimeModel
from llm_cluster_env.sim.prefix_cache import HostCache
from llm_cluster_env.sim.replica import Replica, SimulationError
from llm_cluster_env.sim.request import Request, RequestState

if TYPE_CHECKING:  # the simulator reads configs; it never imports the config layer at run time
    from llm_cluster_env.config import ReplicaConfig


def latency_model(config: ReplicaConfig, cache: MutableMapping | None = None
                  ) -> IterationTimeModel:
    """The iteration-time model of a replica config (from ``cache`` when there, and kept
    there): its (model, GPU, TP) coefficients, with no CPU overhead under ``vllm_v0`` unless
    ``iteration_overhead_s`` is set."""
    overhead = config.iteration_overhead_s
    if overhead is None and config.batching == "vllm_v0":
        overhead = 0.0
    key = ("latency", config.model, config.gpu, config.tensor_parallel, overhead)
    latency = cache.get(key) if cache is not None else None
    if latency is None:
        latency = IterationTimeModel.for_replica(*key[1:])
        if cache is not None:
            cache[key] = latency
    return latency


def build_replica(replica_id: int, config: ReplicaConfig, jump: bool = True,
                  latency_cache: MutableMapping | None = None) -> Replica:
    """A replica with its calibrated latency model and memory-derived KV capacity.

    ``batching="vllm_v0"`` follows Vidur: no CPU overhead unless ``iteration_overhead_s`` is
    set, and KV capacity from :func:`~llm_cluster_env.hardware.vidur_kv_cache_blocks`
    (``ReplicaConfig.kv_cache_blocks``). With ``host_cache`` the replica gets its host tier
    (capacity and transfer time per block from the config). Iteration-time models are
    read-only; replicas of one (model, GPU, TP, overhead) share one from ``latency_cache`` when
    given (building one takes tens of milliseconds).
    """
    latency = latency_model(config, latency_cache)
    host = None
    if config.host_cache:
        host = HostCache(config.host_cache_blocks, config.host_seconds_per_block)
    return Replica(replica_id, config, latency, config.kv_cache_blocks, config.context_tokens,
                   jump=jump, host_cache=host)


class Cluster:
    """N replicas behind a router, driven by one event heap owned by this instance.

    :param replicas: the replicas, indexed by their ``id``.
    :param check_invariants: verify each replica's bookkeeping after every event (slow).
    """

    def __init__(self, replicas: Sequence[Replica], check_invariants: bool = False) -> None:
        if [r.id for r in replicas] != list(range(len(replicas))):
            raise ValueError("replica ids must be 0..N-1 in order")
        self.replicas = list(replicas)
        self.check_invariants = check_invariants
        self.reset([])

    @classmethod
    def from_configs(cls, configs: Sequence[ReplicaConfig], jump: bool = True,
                     check_invariants: bool = False,
                     latency_cache: MutableMapping | None = None) -> Cluster:
        """Build replicas from their configs (see :func:`build_replica`); replicas of one
        hardware share one iteration-time model (kept in ``latency_cache`` if given)."""
        cache = {} if latency_cache is None else latency_cache
        return cls([build_replica(i, c, jump, cache) for i, c in enumerate(configs)],
                   check_invariants)

    @property
    def max_request_tokens(self) -> int:
        """Largest prompt + output (tokens) that every replica can serve."""
        return min(min(r.max_request_tokens, r.max_model_len) for r in self.replicas)

    def reset(self, requests: Sequence[Request]) -> None:
        """Start an episode with ``requests`` (sorted by arrival time)."""
        for replica in self.replicas:
            replica.reset()
        self.requests = list(requests)
        self._next = 0
        self._heap: list[tuple[float, int, int, int]] = []
        self.now = 0.0
        self.in_system = 0
        self.area = 0.0
        self.finished: list[Request] = []  # in finishing order
        self.num_events = 0

    def _next_arrival_time(self) -> float:
        if self._next < len(self.requests):
            return self.requests[self._next].arrival_time
        return math.inf

    def _advance_time(self, t: float) -> None:
        if t < self.now:
            raise SimulationError(f"time went backwards: {t} < {self.now}")
        self.area += self.in_system * (t - self.now)
        self.now = t

    def _start(self, replica: Replica, t: float) -> None:
        end = replica.start_batch(t)
        if end is not None:
            heappush(self._heap, (end, BATCH_END, replica.id, replica.event_version))

    def _schedule_start(self, replica: Replica, t: float) -> None:
        """Start ``replica``'s next batch at ``t``, after any arrival at exactly ``t``."""
        if self._next_arrival_time() > t:
            self._start(replica, t)  # no arrival can tie with t: start now, skip the heap
        else:
            replica.start_pending = True
            heappush(self._heap, (t, BATCH_START, replica.id, replica.event_version))

    def _run(self, t_limit: float, kind_limit: int) -> None:
        """Process events ordered before ``(t_limit, kind_limit)``."""
        heap = self._heap
        replicas = self.replicas
        while heap:
            t, kind, replica_id, version = heap[0]
            if t > t_limit or (t == t_limit and kind >= kind_limit):
                return
            heappop(heap)
            replica = replicas[replica_id]
            if version != replica.event_version:
                continue  # a stretch that was cut short
            self.num_events += 1
            self._advance_time(t)
            if kind == BATCH_END:
                done = replica.end_batch(t)
                if done:
                    self.in_system -= len(done)
                    self.finished.extend(done)
                if replica.has_work():
                    self._schedule_start(replica, t)
            else:
                self._start(replica, t)
            if self.check_invariants:
                replica.check_invariants(t)

    def next_arrival(self) -> Request | None:
        """Advance to the next request's arrival and return it (``None`` when none is left)."""
        if self._next >= len(self.requests):
            return None
        request = self.requests[self._next]
        self._run(request.arrival_time, ARRIVAL)
        self._advance_time(request.arrival_time)
        self._next += 1
        return request

    def dispatch(self, request: Request, replica_id: int) -> None:
        """Send the request that just arrived to replica ``replica_id``."""
        if request.state != RequestState.PENDING:
            raise SimulationError(f"{request!r} was already dispatched")
        replica = self.replicas[replica_id]
        now = self.now
        queue_was_empty = not replica.waiting
        replica.enqueue(request)
        self.in_system += 1
        if replica.busy:
            end = replica.on_dispatch(now, queue_was_empty)
            if end is not None:
                heappush(self._heap, (end, BATCH_END, replica_id, replica.event_version))
        elif not replica.start_pending:
            self._schedule_start(replica, now)

    def drain(self) -> None:
        """Run until every dispatched request has finished."""
        if self._next < len(self.requests):
            raise SimulationError(
                f"drain() with {len(self.requests) - self._next} requests not yet arrived")
        self._run(math.inf, ARRIVAL)
        if self.in_system:
            raise SimulationError(f"{self.in_system} requests never finished")
