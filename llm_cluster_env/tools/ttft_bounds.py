"""Per-request lower bounds on time to first token: what no router can beat.

For each request of an episode two numbers (seconds):

* ``cached``: its TTFT alone on an idle replica that already holds its whole **cacheable
  prefix** on the GPU, i.e. the prefill of the uncached suffix only;
* ``uncached``: its TTFT alone on an idle replica with nothing cached (the full prefill).

Both are the replica's own iteration-time model
(:class:`~llm_cluster_env.sim.latency.IterationTimeModel`, through
:func:`~llm_cluster_env.sim.cluster.build_replica`, so CPU overhead and token budget resolve as
the simulator resolves them) summed over the iterations the replica's batching policy would run
for that request alone: ``mixed_chunked`` prefills in chunks of the token budget
(``max_num_batched_tokens``, default 2,048), each after the tokens before it; ``mixed`` and
``vllm_v0`` prefill the whole remainder in one iteration. The first token is emitted at the end
of the last prefill iteration, and an idle replica starts at the arrival, so that sum *is* the
simulated TTFT of a lone request (tested to 1e-9 s, cold and warm).

**Cacheable prefix** (prefix caching rules of :mod:`llm_cluster_env.sim.prefix_cache`): the
longest run of the request's leading full KV blocks that some *earlier* request of the episode
(lower id = earlier arrival) computes, counting the earlier request's prompt and generated
tokens (``prompt + output - 1`` tokens have KV), capped at ``prefill - 1`` tokens (vLLM computes
at least one token). Every episode starts with empty caches, so no admission can find more
cached (a recompute after a preemption could, from a later request; its TTFT then includes the
lost work anyway). Without prefix caching on any replica the cacheable prefix is 0 and the two
bounds are equal. The host tier's load time is left out (a GPU hit is free).

With several replica types, a request's bound is the smallest over the types (the router could
send it to any). Why the mean of ``cached`` over a window is a floor for the mean TTFT of any
router: a request served with others waits at least as long, because an iteration never gets
shorter when it carries more work, and splitting a prompt into smaller chunks (decodes and other
prompts take budget) adds iterations. That rests on the iteration-time model being
non-decreasing in every input, which the shipped tables are by construction, and on chunking
never being cheaper than the lone schedule; ``benchmarks/prefix_routing.py`` counts requests
below their bound as a check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.sim.cluster import build_replica
from llm_cluster_env.sim.prefix_cache import chain_spans
from llm_cluster_env.sim.replica import Replica
from llm_cluster_env.sim.request import Request

if TYPE_CHECKING:
    from llm_cluster_env.config import ReplicaConfig


@dataclass(frozen=True)
class TTFTBounds:
    """Per-request TTFT lower bounds of one episode, in request order (request id).

    :param request_id: the requests' ids.
    :param cacheable_tokens: prompt tokens of the cacheable prefix (tokens; a multiple of the
        block size of the replica type that gives ``cached``).
    :param cached: TTFT alone with the cacheable prefix cached (seconds).
    :param uncached: TTFT alone with nothing cached (seconds).
    """

    request_id: np.ndarray
    cacheable_tokens: np.ndarray
    cached: np.ndarray
    uncached: np.ndarray

    def __len__(self) -> int:
        return int(self.request_id.size)


def lone_prefill_time(replica: Replica, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """TTFT (seconds) of a request of ``prompt_tokens`` alone on the idle ``replica`` whose
    first ``cached_tokens`` prompt tokens are cached on the GPU: the iterations of its prefill
    from token ``cached_tokens`` on, as :meth:`Replica.start_batch` would schedule them.

    :param replica: a replica (only its batching policy, token budget and latency model are
        read; its state is not touched).
    :param prompt_tokens: tokens to prefill (>= 1).
    :param cached_tokens: cached leading tokens, in ``[0, prompt_tokens)``.
    """
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens={prompt_tokens!r}: must be >= 1 token")
    if not 0 <= cached_tokens < prompt_tokens:
        raise ValueError(f"cached_tokens={cached_tokens!r}: must be in [0, prompt_tokens="
                         f"{prompt_tokens}) (at least one token is computed)")
    latency = replica.latency
    done = cached_tokens
    total = 0.0
    while done < prompt_tokens:
        chunk = prompt_tokens - done
        if replica.chunked_prefill:
            chunk = min(chunk, replica.token_budget)
        total += latency.iteration_time(0, 0, [(chunk, done)])
        done += chunk
    return total


def _computed_blocks(chain: PrefixChain, tokens: int, block_size: int):
    """``(segment, end offset)`` of the full KV blocks over the first ``tokens`` tokens of the
    chain, segment by segment (a request's cached set of each segment is ``[0, end)``)."""
    starts = chain.block_starts(block_size)
    return [(seg, hi) for seg, _, hi in chain_spans(chain.ids, starts, 0, tokens // block_size)]


def cacheable_prefix_tokens(requests: Sequence[Request], block_size: int) -> np.ndarray:
    """Per request (in the given order, which must be arrival order), the prompt tokens of its
    cacheable prefix: leading full blocks that an earlier request's prompt or generated tokens
    cover (``prompt + output - 1`` tokens of each earlier request), at most
    ``(prompt - 1) // block_size`` blocks (tokens; 0 for a request without a chain).

    :param requests: the episode's requests, earliest first.
    :param block_size: KV block size (tokens).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be >= 1 token")
    reach: dict[int, int] = {}  # segment id -> blocks [0, end) computed by earlier requests
    out = np.zeros(len(requests), dtype=np.int64)
    for j, req in enumerate(requests):
        chain = req.chain
        if chain is None:
            continue
        limit = (req.prompt_tokens - 1) // block_size
        starts = chain.block_starts(block_size)
        hit = 0
        for seg, lo, hi in chain_spans(chain.ids, starts, 0, limit):
            have = reach.get(seg, 0)
            if have >= hi:
                hit += hi - lo
                continue
            hit += max(have - lo, 0)
            break
        out[j] = hit * block_size
        for seg, end in _computed_blocks(chain, req.prompt_tokens + req.output_tokens - 1,
                                         block_size):
            if reach.get(seg, 0) < end:
                reach[seg] = end
    return out


def ttft_bounds(requests: Sequence[Request], replica_configs: Sequence[ReplicaConfig]
                ) -> TTFTBounds:
    """TTFT lower bounds of every request of an episode (see the module docstring).

    :param requests: the episode's requests in arrival order (e.g. ``env.cluster.requests``
        after ``reset``; only ids, lengths and chains are read).
    :param replica_configs: the cluster's replica configs (``EnvConfig.replica_configs``); the
        bound is the smallest over the distinct ones.
    """
    if not replica_configs:
        raise ValueError("replica_configs: need at least one replica config")
    n = len(requests)
    cached = np.full(n, np.inf)
    uncached = np.full(n, np.inf)
    cacheable = np.zeros(n, dtype=np.int64)
    prompts = [r.prompt_tokens for r in requests]
    for config in dict.fromkeys(replica_configs):  # distinct, in order
        replica = build_replica(0, config)
        hits = (cacheable_prefix_tokens(requests, config.block_size) if config.prefix_caching
                else np.zeros(n, dtype=np.int64))
        cold = np.array([lone_prefill_time(replica, p) for p in prompts])
        warm = np.array([lone_prefill_time(replica, p, int(h)) if h else c
                         for p, h, c in zip(prompts, hits, cold)])
        better = warm < cached
        cached = np.where(better, warm, cached)
        cacheable = np.where(better, hits, cacheable)
        uncached = np.minimum(uncached, cold)
    return TTFTBounds(np.array([r.id for r in requests], dtype=np.int64), cacheable,
                      cached, uncached)


__all__ = ["TTFTBounds", "cacheable_prefix_tokens", "lone_prefill_time", "ttft_bounds"]
