"""The router's own estimate of what each replica has cached, built from its routing history.

SGLang's cache-aware router keeps an *approximate radix tree* per worker: it inserts every
request's prompt under the worker it chose and evicts the least recently used leaves beyond a
size; llm-d's approximate prefix-cache scorer and Dynamo's router without KV events do the same
with block hashes. :class:`ApproximatePrefixIndex` is that structure over the prefix chains of
:mod:`llm_cluster_env.sim.prefix_cache` (blocks of the replica's block size, runs of one
segment per entry): :meth:`~ApproximatePrefixIndex.insert` marks a routed prompt's blocks as the
most recent on the chosen replica, least recently routed blocks are forgotten beyond
``capacity_blocks``, and :meth:`~ApproximatePrefixIndex.match` is the estimated cached prefix.
The estimate misses what the engine really did: blocks it evicted earlier or later, outputs it
cached, prompts it recomputed after preemption.
"""

from __future__ import annotations

from llm_cluster_env.sim.prefix_cache import RunLRU


class ApproximatePrefixIndex:
    """Blocks routed to one replica, least recently routed forgotten first.

    :param capacity_blocks: blocks remembered (KV blocks).
    """

    __slots__ = ("capacity_blocks", "lengths", "lru")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks={capacity_blocks}: must be >= 1 block")
        self.capacity_blocks = capacity_blocks
        self.reset()

    def reset(self) -> None:
        """Forget everything (start of an episode)."""
        self.lengths: dict[int, int] = {}  # segment -> remembered offsets [0, length)
        self.lru = RunLRU()

    @property
    def size(self) -> int:
        """Blocks remembered."""
        return self.lru.count

    def match(self, ids: tuple[int, ...], starts: tuple[int, ...], limit: int) -> int:
        """Blocks of the chain's longest remembered prefix, at most ``limit``."""
        lengths = self.lengths
        last = len(ids) - 1
        got = 0
        for i, segment in enumerate(ids):  # the chain's spans, as in chain_spans
            s0 = starts[i]
            s1 = starts[i + 1] if i < last else limit
            if s1 > limit:
                s1 = limit
            if s1 <= s0:
                continue
            length = lengths.get(segment, 0)
            if length < s1 - s0:
                return got + length
            got += s1 - s0
            if s1 >= limit:
                break
        return got

    def insert(self, ids: tuple[int, ...], starts: tuple[int, ...], end: int) -> None:
        """Remember the chain's blocks ``[0, end)`` as the most recently routed (within them,
        the prompt's tail is forgotten before its head)."""
        lengths = self.lengths
        lru = self.lru
        i = len(ids) - 1
        while i >= 0 and starts[i] >= end:  # segments past the end: nothing to remember
            i -= 1
        s1 = end
        while i >= 0:  # the chain's spans [0, end), last first (as in chain_spans)
            s0 = starts[i]
            if s1 > s0:
                segment = ids[i]
                hi = s1 - s0
                length = lengths.get(segment, 0)
                if length:
                    lru.remove_below(segment, hi)
                lru.push(segment, 0, hi)
                if length < hi:
                    lengths[segment] = hi
            s1 = s0
            i -= 1
        excess = lru.count - self.capacity_blocks
        if excess > 0:
            for segment, lo, _ in lru.evict(excess):
                if lo:
                    lengths[segment] = lo
                else:
                    del lengths[segment]

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` when the index is inconsistent (tests)."""
        self.lru.check()
        assert self.lru.count <= self.capacity_blocks
        for segment, length in self.lengths.items():
            spans = sorted((run[3], run[4]) for run in self.lru.runs(segment))
            covered = 0
            for lo, hi in spans:
                assert lo == covered, f"segment {segment}: gap at {covered}"
                covered = hi
            assert covered == length, f"segment {segment}: length {length}, runs {covered}"


__all__ = ["ApproximatePrefixIndex"]
