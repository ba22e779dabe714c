"""A request's prompt as segments of shared content (:class:`PrefixChain`).

Workloads whose prompts share prefixes (:mod:`llm_cluster_env.workload.prefix`) describe each
request's content with a chain; replicas that cache prefixes (:mod:`llm_cluster_env.sim.prefix_cache`)
and routers that track them read it. It is a plain value type, so neither side depends on the
other.
"""

from __future__ import annotations


class PrefixChain:
    """A request's token stream as segments of shared content.

    :param ids: segment ids; an id is unique to the whole prefix up to and including its
        segment (two chains that share an id share every token before it and the segment's
        tokens, as far as both reach). The last segment is open-ended: it also covers the
        tokens the request generates (a conversation's next turn continues it), or it is a
        segment unique to the request.
    :param token_starts: first token of each segment; ``token_starts[0] == 0``, increasing.
    :param session_key: the key a session-affinity router hashes (a conversation, tenant or
        user id), or ``-1`` when the workload has none.
    """

    __slots__ = ("ids", "token_starts", "session_key", "_block_starts")

    def __init__(self, ids: tuple[int, ...], token_starts: tuple[int, ...],
                 session_key: int = -1) -> None:
        if len(ids) != len(token_starts) or not ids or token_starts[0] != 0:
            raise ValueError(f"PrefixChain: {len(ids)} ids and {len(token_starts)} starts; "
                             "need one start per id, the first at token 0")
        self.ids = tuple(ids)
        self.token_starts = tuple(token_starts)
        self.session_key = session_key
        self._block_starts: dict[int, tuple[int, ...]] = {}

    def block_starts(self, block_size: int) -> tuple[int, ...]:
        """First KV block of each segment for blocks of ``block_size`` tokens (memoised): the
        block holding a segment's first token belongs to it when the segment holds its last."""
        starts = self._block_starts.get(block_size)
        if starts is None:
            starts = tuple(t // block_size for t in self.token_starts)
            self._block_starts[block_size] = starts
        return starts

    def truncated(self, prompt_tokens: int, tail_id: int) -> PrefixChain:
        """The chain of a prompt cut to ``prompt_tokens`` (oversize clipping): segments that
        start inside the cut prompt are kept, and what follows (the generated tokens) is the
        unique segment ``tail_id``."""
        keep = sum(1 for t in self.token_starts if t < prompt_tokens)
        return PrefixChain(self.ids[:keep] + (tail_id,),
                           self.token_starts[:keep] + (prompt_tokens,), self.session_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefixChain):
            return NotImplemented
        return (self.ids == other.ids and self.token_starts == other.token_starts
                and self.session_key == other.session_key)

    def __hash__(self) -> int:
        return hash((self.ids, self.token_starts, self.session_key))

    def __getstate__(self):
        return (self.ids, self.token_starts, self.session_key)

    def __setstate__(self, state) -> None:
        self.ids, self.token_starts, self.session_key = state
        self._block_starts = {}

    def __repr__(self) -> str:
        return (f"PrefixChain({len(self.ids)} segments, starts={self.token_starts[:4]}"
                f"{'...' if len(self.ids) > 4 else ''}, session_key={self.session_key})")
