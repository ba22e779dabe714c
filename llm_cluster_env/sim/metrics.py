"""Per-request latency records and episode statistics.

Per request (seconds): **TTFT** (arrival to first output token), **TPOT** (time per output token
after the first: ``(finish - first token) / (output tokens - 1)``, undefined for one-token
outputs), **E2E** (arrival to last token), **queueing delay** (arrival to the start of the first
batch that holds the request; also called the scheduling delay) and the number of
**preemptions**.

Per-request records have one schema, :data:`REQUEST_COLUMNS`, shared by the env's
``info["requests"]`` / ``LLMClusterEnv.request_records()`` and the CSV of
:mod:`llm_cluster_env.tools.replay`:

======================  =======  ===================================================  =======
column                  dtype    meaning                                              unit
======================  =======  ===================================================  =======
``request_id``          int64    index of the request in its episode (replay: the     -
                                 0-based data row of the input file)
``arrival_s``           float64  arrival time at the router                           s
``prompt_tokens``       int64    prompt length served (after oversize clipping)       tokens
``output_tokens``       int64    output length served (after oversize clipping)       tokens
``replica``             int64    replica that served it (replay: -1 = rejected)       -
``scheduling_delay_s``  float64  start of its first batch minus arrival               s
``ttft_s``              float64  first output token minus arrival                     s
``e2e_s``               float64  last output token minus arrival                      s
``tpot_s``              float64  time per output token after the first (NaN for       s
                                 one-token outputs)
``preemptions``         int64    times the request was preempted                      -
======================  =======  ===================================================  =======

With prefix caching (any replica with ``prefix_caching``) two columns follow,
:data:`PREFIX_REQUEST_COLUMNS` (replay output for inputs without prefix caching is unchanged):

==========================  =======  ==============================================  =======
column                      dtype    meaning                                         unit
==========================  =======  ==============================================  =======
``cached_prompt_tokens``    int64    prompt tokens found cached at the request's     tokens
                                     first admission (GPU or host tier), not
                                     computed
``host_prompt_tokens``      int64    of those, loaded from the host tier             tokens
==========================  =======  ==============================================  =======

The episode statistics call the scheduling delay ``queueing`` (``queueing_mean`` ...).

Per episode: mean/p50/p90/p99 of each, throughput, SLO attainment, SLO goodput (below),
per-replica utilisation
(busy fraction of the episode; with continuous batching a replica is busy whenever it holds a
request, so this saturates near 1 well below capacity) and time-averaged running batch size
(the better load indicator), dispatch shares and the balance score ``1 - std(shares)`` of the
design documents (1 is perfectly even).

**SLO goodput** (DistServe, OSDI'24: the rate of requests that meet their latency targets):
``goodput_rps`` = finished requests whose TTFT <= ``ttft_slo_s`` **and** whose TPOT <=
``tpot_slo_s`` (a one-token output has no TPOT and needs only the TTFT target), divided by the
episode's span ``makespan_s`` = the first arrival of the episode to the last completion
(seconds; the same span as ``throughput_rps``). Requests rejected before routing or not
finished count as missing. So ``goodput_rps = slo_attainment * throughput_rps``: the
throughput a router delivers *within* the SLO; a router that serves everything late scores 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llm_cluster_env.sim.request import Request, RequestState

PERCENTILES = (50, 90, 99)


#: Per-request record columns, in order (see the table in the module docstring).
REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id", "arrival_s", "prompt_tokens", "output_tokens", "replica",
    "scheduling_delay_s", "ttft_s", "e2e_s", "tpot_s", "preemptions",
)
#: Per-request columns added when the replicas cache prefixes.
PREFIX_REQUEST_COLUMNS: tuple[str, ...] = ("cached_prompt_tokens", "host_prompt_tokens")
#: Columns holding integers (int64); the others are float64 seconds.
INTEGER_COLUMNS = frozenset({"request_id", "prompt_tokens", "output_tokens", "replica",
                             "preemptions", *PREFIX_REQUEST_COLUMNS})
#: The :class:`RequestLatencies` field behind each column.
_COLUMN_FIELDS = {
    "request_id": "request_id", "arrival_s": "arrival", "prompt_tokens": "prompt_tokens",
    "output_tokens": "output_tokens", "replica": "replica", "scheduling_delay_s": "queueing",
    "ttft_s": "ttft", "e2e_s": "e2e", "tpot_s": "tpot", "preemptions": "preemptions",
    "cached_prompt_tokens": "cached_tokens", "host_prompt_tokens": "host_tokens",
}


class RequestRecords(Mapping[str, np.ndarray]):
    """Per-request records as a read-only ``column -> array`` mapping, columns
    :data:`REQUEST_COLUMNS` in order, one entry per request.

    Deliberately a :class:`~collections.abc.Mapping` and not a ``dict``: gymnasium's vector envs
    recurse into ``dict`` infos and stack arrays across sub-environments, which fails when two
    episodes ending on the same step served different numbers of requests; an object that is
    neither is kept whole, one per sub-environment.
    """

    __slots__ = ("_columns",)

    def __init__(self, columns: Mapping[str, np.ndarray]) -> None:
        self._columns = dict(columns)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._columns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    @property
    def num_requests(self) -> int:
        """Number of requests (rows)."""
        return int(next(iter(self._columns.values())).size) if self._columns else 0

    def __repr__(self) -> str:
        return f"RequestRecords({self.num_requests} requests, columns={list(self._columns)})"


@dataclass(frozen=True)
class RequestLatencies:
    """Per-request arrays of the finished requests, in request-id order (times in seconds)."""

    e2e: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray  # NaN for one-token outputs
    queueing: np.ndarray  # the scheduling delay: start of the first batch minus arrival
    preemptions: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    replica: np.ndarray
    finish_time: np.ndarray
    request_id: np.ndarray
    arrival: np.ndarray
    cached_tokens: np.ndarray  # prompt tokens cached at the first admission (0 without caching)
    host_tokens: np.ndarray  # of those, loaded from the host tier

    @classmethod
    def from_requests(cls, requests: Sequence[Request], time_origin_s: float = 0.0
                      ) -> RequestLatencies:
        """Records of the finished ``requests``; their simulated times are relative to
        ``time_origin_s`` (seconds), which is added back to ``arrival`` and ``finish_time``
        after the latencies are taken (so they keep full precision)."""
        done = sorted((r for r in requests if r.state == RequestState.FINISHED), key=lambda r: r.id)
        arrival = np.array([r.arrival_time for r in done], dtype=np.float64)
        first = np.array([r.first_token_time for r in done], dtype=np.float64)
        finish = np.array([r.finish_time for r in done], dtype=np.float64)
        out = np.array([r.output_tokens for r in done], dtype=np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), np.nan)
        return cls(
            e2e=finish - arrival,
            ttft=first - arrival,
            tpot=tpot,
            queueing=np.array([r.first_scheduled_time for r in done], dtype=np.float64) - arrival,
            preemptions=np.array([r.num_preemptions for r in done], dtype=np.int64),
            prompt_tokens=np.array([r.prompt_tokens for r in done], dtype=np.int64),
            output_tokens=out,
            replica=np.array([r.replica_id for r in done], dtype=np.int64),
            finish_time=finish + time_origin_s,
            request_id=np.array([r.id for r in done], dtype=np.int64),
            arrival=arrival + time_origin_s,
            cached_tokens=np.array([max(r.cached_tokens, 0) for r in done], dtype=np.int64),
            host_tokens=np.array([r.host_tokens for r in done], dtype=np.int64),
        )

    def __len__(self) -> int:
        """Number of finished requests."""
        return int(self.e2e.size)

    def columns(self, prefix: bool = False) -> RequestRecords:
        """The per-request records as ``column -> array`` in :data:`REQUEST_COLUMNS` order, then
        :data:`PREFIX_REQUEST_COLUMNS` with ``prefix`` (fresh copies; int64 for
        :data:`INTEGER_COLUMNS`, float64 otherwise)."""
        names = REQUEST_COLUMNS + (PREFIX_REQUEST_COLUMNS if prefix else ())
        return RequestRecords({
            name: np.array(getattr(self, _COLUMN_FIELDS[name]),
                           dtype=np.int64 if name in INTEGER_COLUMNS else np.float64)
            for name in names})

    def to_rows(self, prefix: bool = False) -> list[tuple[int | float, ...]]:
        """One tuple of Python numbers per request, in :meth:`columns` order."""
        return list(zip(*(values.tolist() for values in self.columns(prefix).values())))


def prefix_cache_metrics(latencies: RequestLatencies, replicas: Sequence) -> dict[str, float]:
    """Prefix-cache statistics of an episode (replicas with a prefix cache), flat:

    * ``prefix_hit_rate_tokens`` / ``prefix_hit_rate_blocks``: share of the prompt tokens /
      KV blocks (``ceil(prompt / block_size)`` per request) found cached at each request's
      first admission (GPU or host tier), over all requests and per replica (``_{i}``);
    * ``prefix_host_hit_rate_blocks``: the share loaded from the host tier;
    * ``prefill_tokens_saved``: tokens not prefilled thanks to the cache, over every
      admission (recomputes after preemption included), and
      ``prefill_tokens_saved_fraction`` = saved / (saved + prefilled);
    * ``cache_evicted_blocks``: blocks evicted from the GPU caches.
    """
    out: dict[str, float] = {}
    prompt = latencies.prompt_tokens
    cached = latencies.cached_tokens
    out["prefix_hit_rate_tokens"] = float(cached.sum() / max(prompt.sum(), 1))
    blocks = sum(r.prompt_blocks for r in replicas)
    out["prefix_hit_rate_blocks"] = sum(r.hit_blocks for r in replicas) / max(blocks, 1)
    out["prefix_host_hit_rate_blocks"] = sum(r.host_hit_blocks for r in replicas) / max(blocks, 1)
    saved = sum(r.prefill_tokens_saved for r in replicas)
    computed = sum(r.prefill_tokens_computed for r in replicas)
    out["prefill_tokens_saved"] = float(saved)
    out["prefill_tokens_saved_fraction"] = saved / max(saved + computed, 1)
    out["cache_evicted_blocks"] = float(sum(r.cache.blocks_evicted for r in replicas
                                            if r.cache is not None))
    for i, rep in enumerate(replicas):
        mine = latencies.replica == i
        out[f"prefix_hit_rate_tokens_{i}"] = float(cached[mine].sum()
                                                   / max(prompt[mine].sum(), 1))
        out[f"prefix_hit_rate_blocks_{i}"] = rep.hit_blocks / max(rep.prompt_blocks, 1)
    return out


def balance_score(counts: Sequence[float] | np.ndarray) -> float:
    """``1 - std(shares)`` of a dispatch-count vector (1.0 = perfectly even, 0 requests -> 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 1.0
    return float(1.0 - np.std(counts / total))


def _stats(prefix: str, values: np.ndarray, out: dict[str, float]) -> None:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        out[f"{prefix}_mean"] = float("nan")
        for p in PERCENTILES:
            out[f"{prefix}_p{p}"] = float("nan")
        return
    out[f"{prefix}_mean"] = float(values.mean())
    for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        out[f"{prefix}_p{p}"] = float(v)


def episode_metrics(
    latencies: RequestLatencies,
    *,
    dispatch_counts: Sequence[int],
    busy_time: Sequence[float],
    makespan_s: float,
    batch_time: Sequence[float] | None = None,
    ttft_slo_s: float,
    tpot_slo_s: float,
    num_rejected: int = 0,
    num_clipped: int = 0,
) -> dict[str, float]:
    """Summary statistics of one episode as a flat ``name -> float`` dict.

    :param latencies: the finished requests.
    :param dispatch_counts: requests routed to each replica.
    :param busy_time: seconds each replica spent running iterations.
    :param makespan_s: time from the first arrival to the last completion (seconds).
    :param batch_time: per replica, the integral of the batch size over its busy time
        (request-seconds); gives the time-averaged running batch size.
    :param ttft_slo_s: TTFT target (seconds). :param tpot_slo_s: TPOT target (seconds). A
        request meets them with ``ttft <= ttft_slo_s`` and ``tpot <= tpot_slo_s`` (no TPOT
        for one-token outputs); ``goodput_rps`` counts those per second of ``makespan_s``.
    :param num_rejected: requests dropped before routing. :param num_clipped: requests shortened.
    """
    out: dict[str, float] = {}
    _stats("e2e", latencies.e2e, out)
    _stats("ttft", latencies.ttft, out)
    _stats("tpot", latencies.tpot, out)
    _stats("queueing", latencies.queueing, out)
    n = latencies.e2e.size
    out["num_requests"] = float(n)
    out["num_rejected"] = float(num_rejected)
    out["num_clipped"] = float(num_clipped)
    out["preemptions_mean"] = float(latencies.preemptions.mean()) if n else 0.0
    out["preempted_fraction"] = float((latencies.preemptions > 0).mean()) if n else 0.0
    span = max(makespan_s, 1e-12)
    out["makespan_s"] = float(makespan_s)
    out["throughput_rps"] = n / span
    out["throughput_tps"] = float(latencies.output_tokens.sum()) / span
    ttft_ok = latencies.ttft <= ttft_slo_s
    tpot_ok = np.isnan(latencies.tpot) | (latencies.tpot <= tpot_slo_s)
    out["slo_ttft_attainment"] = float(ttft_ok.mean()) if n else 1.0
    out["slo_tpot_attainment"] = float(tpot_ok.mean()) if n else 1.0
    out["slo_attainment"] = float((ttft_ok & tpot_ok).mean()) if n else 1.0
    out["goodput_rps"] = float(np.count_nonzero(ttft_ok & tpot_ok)) / span
    counts = np.asarray(dispatch_counts, dtype=np.float64)
    shares = counts / max(counts.sum(), 1.0)
    out["balance"] = balance_score(counts)
    busy_s = np.asarray(busy_time, dtype=np.float64)
    busy = busy_s / span
    out["utilization_mean"] = float(busy.mean())
    for i, (share, util) in enumerate(zip(shares, busy)):
        out[f"dispatch_share_{i}"] = float(share)
        out[f"utilization_{i}"] = float(util)
    if batch_time is not None:
        mean_batch = np.asarray(batch_time, dtype=np.float64) / np.maximum(busy_s, 1e-12)
        out["batch_size_mean"] = float(np.sum(batch_time) / max(busy_s.sum(), 1e-12))
        for i, b in enumerate(mean_batch):
            out[f"batch_size_mean_{i}"] = float(b)
    return out
