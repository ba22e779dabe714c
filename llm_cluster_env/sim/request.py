"""One inference request and its life cycle inside the simulator."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llm_cluster_env.prefix_chain import PrefixChain


class RequestState(IntEnum):
    """Where a request is. Transitions: PENDING -> WAITING -> PREFILLING -> DECODING -> FINISHED,
    with preemption sending PREFILLING/DECODING back to the front of WAITING."""

    PENDING = 0  # generated, not yet arrived/dispatched
    WAITING = 1  # in a replica's FCFS queue, holding no KV blocks
    PREFILLING = 2  # admitted, prompt (or recompute) prefill not finished
    DECODING = 3  # producing one output token per iteration
    FINISHED = 4


class Request:
    """A request: its lengths, its timestamps, and the bookkeeping a replica keeps for it.

    Token counts are in tokens, times in simulated seconds from the episode start. While a
    request is DECODING, its number of generated tokens is not stored but derived from the
    replica's iteration clock: ``generated = replica.clock - decode_offset``. That is what lets a
    replica advance a pure-decode stretch without touching every request.

    :param request_id: index of the request in its episode.
    :param arrival_time: when the request reaches the router (seconds).
    :param prompt_tokens: prompt length (tokens).
    :param output_tokens: tokens to generate, including the first (>= 1).
    :param chain: the prompt's block identities (:class:`~llm_cluster_env.sim.prefix_cache.
        PrefixChain`) for replicas that cache prefixes; ``None`` = content shared with no other
        request.
    """

    __slots__ = (
        "id", "arrival_time", "prompt_tokens", "output_tokens",
        "replica_id", "state",
        "generated",  # output tokens produced so far (valid when not DECODING)
        "prefill_tokens",  # tokens this admission must prefill: prompt + generated (recompute)
        "prefilled",  # of prefill_tokens, how many are done (chunked prefill)
        "admit_seq",  # replica-local admission counter; orders preemption
        "decode_offset",  # generated = replica.clock - decode_offset while DECODING
        "blocks",  # KV blocks held while PREFILLING
        "first_scheduled_time", "first_token_time", "finish_time",
        "num_preemptions",
        # prefix caching (replicas with a PrefixCache)
        "chain",  # PrefixChain or None
        "chain_ids", "chain_starts",  # the chain's segment ids and first blocks on its replica
        "cache_refs",  # leading chain blocks this request references in the replica's cache
        "cached_tokens",  # prompt tokens found cached at its first admission (GPU + host), -1
        "host_tokens",  # of those, loaded from the host tier
        "load_s",  # host-tier transfer time owed by its next iteration (seconds)
    )

    def __init__(self, request_id: int, arrival_time: float, prompt_tokens: int,
                 output_tokens: int, chain: PrefixChain | None = None) -> None:
        self.id = request_id
        self.arrival_time = arrival_time
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.replica_id = -1
        self.state = RequestState.PENDING
        self.generated = 0
        self.prefill_tokens = prompt_tokens
        self.prefilled = 0
        self.admit_seq = -1
        self.decode_offset = 0
        self.blocks = 0
        self.first_scheduled_time = -1.0
        self.first_token_time = -1.0
        self.finish_time = -1.0
        self.num_preemptions = 0
        self.chain = chain
        self.chain_ids: tuple[int, ...] | None = None
        self.chain_starts: tuple[int, ...] = ()
        self.cache_refs = 0
        self.cached_tokens = -1
        self.host_tokens = 0
        self.load_s = 0.0

    def clone(self) -> Request:
        """A copy with every field (for what-if copies of a replica)."""
        new = Request.__new__(Request)
        for name in Request.__slots__:
            setattr(new, name, getattr(self, name))
        return new

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, state={self.state.name}, prompt={self.prompt_tokens}, "
                f"output={self.output_tokens}, replica={self.replica_id})")
