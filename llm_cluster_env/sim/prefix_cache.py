"""Automatic prefix caching: KV blocks identified by the chain of their content, kept after use.

This follows vLLM's automatic prefix caching (APC). A full KV block of ``block_size`` tokens is
identified by its content *and* everything before it (vLLM hashes the block's tokens together
with its parent block's hash), so two requests share a cached block only when they share the
whole prefix up to it. A block is shared by reference count between running requests; when the
last holder releases it (its request finished or was preempted) the block stays cached and joins
the *evictable* queue; it is evicted, least recently released first, only when a new block is
needed and no uncached block is free. Admission and the watermark count evictable blocks as free
(vLLM's scheduler does the same).

Block identities as segments
----------------------------
Simulating blocks one by one would cost per request work proportional to its prompt length in
Python. Instead a request's token stream is a :class:`PrefixChain` of *segments*: runs of tokens
that every request containing them shares in full (a Mooncake hash block of 512 tokens, a
system prompt, a conversation's history), each with an integer id that is unique to the whole
prefix up to it. KV block ``b`` (tokens ``[b * bs, (b + 1) * bs)``) belongs to the segment that
holds its last token, at offset ``b - start_token // bs``, so block ``(segment, offset)`` is
exactly vLLM's chained block hash. The structures below keep *runs* of consecutive offsets of
one segment, so every operation costs O(segments of the request), not O(blocks).

Orders that make runs exact
---------------------------
Every access to a block also touches every block before it in its chain (a request holds a
prefix), and when a request releases its blocks they join the evictable queue last block first
(vLLM frees a request's blocks in reverse, so its tail is evicted first). Hence within a segment
lower offsets are never released earlier than higher ones, and the evictable queue always
presents a segment's *highest* cached offsets first: the cached set of every segment is a prefix
``[0, length)`` of its offsets, and a child segment is evicted before its parent. Eviction takes
whole runs or the top of a run; :meth:`PrefixCache.check_invariants` verifies this.

What is counted where
---------------------
The replica keeps nominal KV counts per request (``ceil(tokens / bs)`` blocks, in closed form
for decoding requests). A request references the first ``cache_refs`` blocks of its chain in
the cache; the rest of its blocks are private (being computed, a partial last block, generated
tokens). Blocks physically in use are ``nominal - (held_refs - held_distinct)``: the sum over
requests of referenced blocks minus the number of distinct referenced blocks is what sharing
saves. A block a request computes while another request registered the same identity is
*adopted*: the request references the existing block and its own copy is freed (vLLM v0's
``promote_to_immutable_block`` and SGLang's radix-tree insert do the same).

Host tier
---------
:class:`HostCache` is an optional second tier in host memory (as Mooncake, LMCache and vLLM's
KV offloading have): blocks evicted from the GPU are written to it, it evicts least recently
used runs beyond its capacity, and a request whose GPU-cached prefix ends where host-cached
blocks continue loads them over PCIe instead of recomputing them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from copy import deepcopy
from heapq import heapify, heappop, heappush

# re-exported: checkpoints pickled before 2026-12-04 name the class here
from llm_cluster_env.prefix_chain import PrefixChain  # noqa: F401


def chain_spans(ids: tuple[int, ...], starts: tuple[int, ...], begin: int, end: int):
    """``(segment id, first offset, end offset)`` of the chain's blocks ``[begin, end)``, segment
    by segment in chain order (offsets are relative to each segment's first block)."""
    last = len(ids) - 1
    for i, seg in enumerate(ids):
        s0 = starts[i]
        s1 = starts[i + 1] if i < last else end
        if s1 > end:
            s1 = end
        if s1 <= begin or s1 <= s0:  # before the range, or no whole block of its own
            continue
        lo = begin if begin > s0 else s0
        yield seg, lo - s0, s1 - s0
        if s1 >= end:
            return


class RunLRU:
    """Runs of consecutive block offsets of one segment, in least-recently-used order.

    A run ``[stamp, order, segment, lo, hi]`` holds offsets ``[lo, hi)``; runs are evicted by
    ``(stamp, order)``, the top of a run (highest offsets) first. Pushing makes a run the most
    recent. Removing blocks from the middle of a run splits it; both pieces keep its stamp and
    the upper one goes first. ``count`` is the number of blocks held.
    """

    __slots__ = ("_heap", "_by_segment", "_counter", "_live", "count")

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._by_segment: dict[int, list[list]] = {}
        self._counter = 0
        self._live = 0  # runs alive (the heap also holds dead ones until compaction)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __deepcopy__(self, memo: dict) -> RunLRU:
        """A copy of the live runs (dead heap entries dropped): one list copy per run, fast
        enough for look-ahead routers that copy replica state."""
        new = RunLRU.__new__(RunLRU)
        copies: dict[int, list] = {}
        by_segment = {}
        for segment, runs in self._by_segment.items():
            mine = []
            for run in runs:
                twin = run[:]
                copies[id(run)] = twin
                mine.append(twin)
            by_segment[segment] = mine
        heap = [copies[id(run)] for run in self._heap if id(run) in copies]
        heapify(heap)
        new._heap = heap
        new._by_segment = by_segment
        new._counter = self._counter
        new._live = self._live
        new.count = self.count
        memo[id(self)] = new
        return new

    def runs(self, segment: int) -> list[list]:
        """The live runs of ``segment`` (the structure's own list: do not modify)."""
        return self._by_segment.get(segment, [])

    def push(self, segment: int, lo: int, hi: int) -> None:
        """Add offsets ``[lo, hi)`` of ``segment`` (not already held) as the most recent run."""
        if hi <= lo:
            return
        self._counter += 1
        run = [self._counter, self._counter, segment, lo, hi]
        heappush(self._heap, run)
        runs = self._by_segment.get(segment)
        if runs is None:
            self._by_segment[segment] = [run]
        else:
            runs.append(run)
        self._live += 1
        self.count += hi - lo

    def remove_below(self, segment: int, end: int) -> int:
        """Remove offsets ``< end`` of ``segment``; returns how many blocks were removed."""
        runs = self._by_segment.get(segment)
        if not runs:
            return 0
        if len(runs) == 1:  # the common case: one run
            run = runs[0]
            lo, hi = run[3], run[4]
            if lo >= end:
                return 0
            if hi <= end:
                run[3] = run[4] = 0  # dead; dropped from the heap lazily
                self._live -= 1
                del self._by_segment[segment]
                self.count -= hi - lo
                self._maybe_compact()
                return hi - lo
            run[3] = end
            self.count -= end - lo
            return end - lo
        removed = 0
        keep = []
        for run in runs:
            lo, hi = run[3], run[4]
            if hi <= end:
                removed += hi - lo
                run[3] = run[4] = 0  # dead; dropped from the heap lazily
                self._live -= 1
            else:
                if lo < end:
                    removed += end - lo
                    run[3] = end
                keep.append(run)
        if keep:
            self._by_segment[segment] = keep
        else:
            del self._by_segment[segment]
        self.count -= removed
        self._maybe_compact()
        return removed

    def remove(self, segment: int, lo: int, hi: int) -> int:
        """Remove offsets ``[lo, hi)`` of ``segment`` wherever held (splitting runs); returns
        how many blocks were removed."""
        runs = self._by_segment.get(segment)
        if not runs:
            return 0
        removed = 0
        keep = []
        for run in runs:
            a, b = run[3], run[4]
            if b <= lo or a >= hi:
                keep.append(run)
                continue
            removed += min(b, hi) - max(a, lo)
            if a < lo and b > hi:  # split: the upper piece keeps the run, the lower follows it
                run[3] = hi
                self._counter += 1
                low = [run[0], self._counter, segment, a, lo]
                heappush(self._heap, low)
                self._live += 1
                keep += (run, low)
            elif a < lo:
                run[4] = lo
                keep.append(run)
            elif b > hi:
                run[3] = hi
                keep.append(run)
            else:
                run[3] = run[4] = 0
                self._live -= 1
        if keep:
            self._by_segment[segment] = keep
        else:
            del self._by_segment[segment]
        self.count -= removed
        self._maybe_compact()
        return removed

    def evict(self, blocks: int) -> list[tuple[int, int, int]]:
        """Evict ``blocks`` blocks (or all), oldest runs first, each from its top; returns the
        evicted ``(segment, lo, hi)`` pieces in eviction order."""
        out: list[tuple[int, int, int]] = []
        heap = self._heap
        while blocks > 0 and heap:
            run = heap[0]
            lo, hi = run[3], run[4]
            if hi <= lo:
                heappop(heap)
                continue
            take = hi - lo if hi - lo <= blocks else blocks
            segment = run[2]
            out.append((segment, hi - take, hi))
            blocks -= take
            self.count -= take
            if take == hi - lo:
                heappop(heap)
                run[3] = run[4] = 0
                self._live -= 1
                runs = self._by_segment[segment]
                runs.remove(run)
                if not runs:
                    del self._by_segment[segment]
            else:
                run[4] = hi - take
        return out

    def covered_from(self, segment: int, start: int, limit: int) -> int:
        """End of the contiguous held offsets of ``segment`` from ``start`` (``start`` itself
        when it is not held), at most ``limit``."""
        runs = self._by_segment.get(segment)
        if not runs:
            return start
        end = start
        if len(runs) == 1:
            lo, hi = runs[0][3], runs[0][4]
            return min(hi, limit) if lo <= start < hi else start
        for lo, hi in sorted((run[3], run[4]) for run in runs):
            if lo <= end < hi:
                end = hi
            elif lo > end:
                break
        return min(end, limit)

    def _maybe_compact(self) -> None:
        heap = self._heap
        if len(heap) > 64 and len(heap) > 4 * self._live:
            self._heap = [run for run in heap if run[4] > run[3]]
            heapify(self._heap)

    def check(self) -> None:
        """Raise ``AssertionError`` if the runs overlap or the count drifted (tests)."""
        total = 0
        assert self._live == sum(len(r) for r in self._by_segment.values()), "live runs drifted"
        for segment, runs in self._by_segment.items():
            spans = sorted((run[3], run[4]) for run in runs)
            assert all(hi > lo for lo, hi in spans), f"empty run of segment {segment}"
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"overlap in {segment}"
            total += sum(hi - lo for lo, hi in spans)
        assert total == self.count, f"run count {self.count} != {total}"


class HostCache:
    """The second tier: host memory that receives blocks evicted from the GPU.

    :param capacity_blocks: blocks the host memory holds (capacity in bytes divided by the KV
        bytes of one block).
    :param seconds_per_block: time to load one block back to the GPU (block bytes divided by
        the PCIe bandwidth).
    """

    __slots__ = ("capacity_blocks", "seconds_per_block", "lru", "blocks_written",
                 "blocks_loaded")

    def __init__(self, capacity_blocks: int, seconds_per_block: float) -> None:
        self.capacity_blocks = capacity_blocks
        self.seconds_per_block = seconds_per_block
        self.lru = RunLRU()
        self.blocks_written = 0
        self.blocks_loaded = 0

    def write(self, pieces: list[tuple[int, int, int]]) -> None:
        """Store evicted ``(segment, lo, hi)`` pieces as the most recent, evicting the least
        recently used beyond capacity."""
        lru = self.lru
        for segment, lo, hi in pieces:
            lru.remove(segment, lo, hi)
            lru.push(segment, lo, hi)
            self.blocks_written += hi - lo
        excess = lru.count - self.capacity_blocks
        if excess > 0:
            lru.evict(excess)

    def match(self, ids: tuple[int, ...], starts: tuple[int, ...], begin: int,
              limit: int) -> int:
        """Blocks of the chain held here contiguously from block ``begin`` (up to ``limit``)."""
        lru = self.lru
        got = begin
        for segment, lo, hi in chain_spans(ids, starts, begin, limit):
            end = lru.covered_from(segment, lo, hi)
            got += end - lo
            if end < hi:
                break
        return got - begin

    def touch(self, ids: tuple[int, ...], starts: tuple[int, ...], begin: int, end: int) -> None:
        """Mark the chain's blocks ``[begin, end)`` (loaded to the GPU) most recently used."""
        lru = self.lru
        for segment, lo, hi in reversed(list(chain_spans(ids, starts, begin, end))):
            lru.remove(segment, lo, hi)
            lru.push(segment, lo, hi)
        self.blocks_loaded += end - begin

    def reset(self) -> None:
        self.lru = RunLRU()
        self.blocks_written = 0
        self.blocks_loaded = 0


class PrefixCache:
    """The cached KV blocks of one replica: registered blocks, their holders, the evictable LRU.

    The replica calls :meth:`match` at admission, :meth:`hold` for the blocks a request
    references (prefix hits and the blocks it computed), :meth:`release` when a request
    finishes or is preempted, and :meth:`allocate` whenever blocks were allocated, with the
    number of blocks physically in use, so that exactly as many cached blocks are evicted as
    vLLM would evict to find free blocks (oldest released first).

    Evictions are applied lazily: :meth:`allocate` only records how many blocks are *due* from
    the head of the evictable queue, and they are evicted before anything reads the cached
    set (:meth:`match`, :meth:`flush`) or takes blocks out of the queue (a hold or
    registration that reaches evictable blocks). Releases and new registrations in between
    only append to the queue's tail or add blocks outside it, so the blocks evicted are the
    same (the count due is the largest excess seen since the last flush: later releases free
    blocks but cannot undo an earlier eviction).

    :param num_blocks: KV-cache capacity (blocks).
    :param host: the optional host-memory tier that receives evicted blocks.
    """

    __slots__ = ("num_blocks", "lengths", "holders", "evictable", "held_refs", "held_distinct",
                 "host", "blocks_evicted", "due")

    def __init__(self, num_blocks: int, host: HostCache | None = None) -> None:
        self.num_blocks = num_blocks
        self.host = host
        self.reset()

    def __deepcopy__(self, memo: dict) -> PrefixCache:
        new = PrefixCache.__new__(PrefixCache)
        memo[id(self)] = new
        new.num_blocks = self.num_blocks
        new.host = deepcopy(self.host, memo)
        new.lengths = dict(self.lengths)
        new.holders = {segment: held[:] for segment, held in self.holders.items()}
        new.evictable = deepcopy(self.evictable, memo)
        new.held_refs = self.held_refs
        new.held_distinct = self.held_distinct
        new.blocks_evicted = self.blocks_evicted
        new.due = self.due
        return new

    def reset(self) -> None:
        """Empty the cache (start of an episode)."""
        self.lengths: dict[int, int] = {}  # segment -> registered offsets [0, length)
        self.holders: dict[int, list[int]] = {}  # segment -> sorted hold lengths
        self.evictable = RunLRU()
        self.held_refs = 0  # sum over requests of the blocks they reference
        self.held_distinct = 0  # distinct registered blocks with a holder
        self.blocks_evicted = 0
        self.due = 0  # evictable blocks to evict from the queue's head before the next read
        if self.host is not None:
            self.host.reset()

    @property
    def shared_blocks(self) -> int:
        """Blocks that sharing saves: references minus distinct referenced blocks."""
        return self.held_refs - self.held_distinct

    def cached_blocks(self, used_blocks: int) -> int:
        """Registered blocks (in use or evictable) once the evictions that ``used_blocks``
        blocks in use imply are applied: the reusable content (blocks)."""
        evictable = self.evictable.count - self.due
        free = self.num_blocks - used_blocks
        return self.held_distinct + (evictable if evictable < free else free)

    def match(self, ids: tuple[int, ...], starts: tuple[int, ...],
              limit: int) -> tuple[int, int]:
        """Longest cached prefix of the chain, at most ``limit`` blocks: ``(blocks, of them
        evictable)`` (taking evictable blocks uses free capacity)."""
        if self.due:
            self.flush()
        lengths = self.lengths
        holders = self.holders
        last = len(ids) - 1
        got = 0
        evictable = 0
        for i, segment in enumerate(ids):  # the chain's spans, as in chain_spans
            s0 = starts[i]
            s1 = starts[i + 1] if i < last else limit
            if s1 > limit:
                s1 = limit
            if s1 <= s0:
                continue
            hi = s1 - s0
            length = lengths.get(segment, 0)
            end = hi if length >= hi else length
            if end <= 0:
                break
            held = holders.get(segment)
            top = held[-1] if held else 0
            if end > top:
                evictable += end - top
            got += end
            if end < hi or s1 >= limit:
                break
        return got, evictable

    def hold(self, ids: tuple[int, ...], starts: tuple[int, ...], begin: int, end: int) -> None:
        """A request that references the chain's blocks ``[0, begin)`` now references
        ``[0, end)``: existing blocks gain a holder (leaving the evictable queue), missing ones
        are registered as computed by it."""
        lengths = self.lengths
        holders = self.holders
        last = len(ids) - 1
        for i, segment in enumerate(ids):  # the chain's spans [begin, end), as in chain_spans
            s0 = starts[i]
            s1 = starts[i + 1] if i < last else end
            if s1 > end:
                s1 = end
            if s1 <= begin or s1 <= s0:
                continue
            lo = begin - s0 if begin > s0 else 0
            hi = s1 - s0
            held = holders.get(segment)
            if held is None:
                holders[segment] = [hi]
                top = 0
            else:
                top = held[-1]
                if lo:
                    del held[bisect_left(held, lo)]
                insort(held, hi)
            length = lengths.get(segment, 0)
            if hi > top:
                self.held_distinct += hi - (top if top > lo else lo)
                if length > top:  # evictable blocks gain a holder (after what is due)
                    if self.due:
                        self.flush()
                        length = lengths.get(segment, 0)
                    self.evictable.remove_below(segment, hi)
            if hi > length:
                lengths[segment] = hi
            self.held_refs += hi - lo
            if s1 >= end:
                break

    def release(self, ids: tuple[int, ...], starts: tuple[int, ...], held: int,
                end: int) -> None:
        """A request that references the chain's blocks ``[0, held)`` and computed blocks up to
        ``end`` registers ``[held, end)`` and drops all its references: blocks left without a
        holder join the evictable queue, the request's last block first. (The same as
        ``hold(..., held, end)`` then releasing ``[0, end)``, in one pass.)"""
        holders = self.holders
        lengths = self.lengths
        evictable = self.evictable
        i = len(ids) - 1
        while i >= 0 and starts[i] >= end:  # segments past the end hold nothing
            i -= 1
        s1 = end
        refs = 0
        distinct = 0
        while i >= 0:  # the chain's spans [0, end), last first
            s0 = starts[i]
            if s1 > s0:
                segment = ids[i]
                hi = s1 - s0
                mine = held - s0  # the request's hold on this segment before
                if mine > hi:
                    mine = hi
                top = 0
                if mine > 0:
                    others = holders[segment]
                    del others[bisect_left(others, mine)]
                    if others:
                        top = others[-1]
                    else:
                        del holders[segment]
                    refs += mine
                else:
                    others = holders.get(segment)
                    if others:
                        top = others[-1]
                if top < hi:  # [top, hi) becomes evictable, the most recent run
                    length = lengths.get(segment, 0)
                    if length > top and mine < hi:  # registering touched evictable blocks
                        if self.due:  # (after evicting what is due)
                            self.flush()
                            length = lengths.get(segment, 0)
                        evictable.remove_below(segment, hi)
                    evictable.push(segment, top, hi)
                    if hi > length:
                        lengths[segment] = hi
                    if mine > top:
                        distinct += mine - top
            s1 = s0
            i -= 1
        self.held_distinct -= distinct
        self.held_refs -= refs

    def allocate(self, used_blocks: int) -> None:
        """Blocks were allocated: ``used_blocks`` are in use. Cached blocks must be evicted
        until the free blocks cover them (blocks in use, evictable blocks and uncached free
        blocks add up to the capacity); they are evicted lazily (see the class)."""
        due = self.evictable.count + used_blocks - self.num_blocks
        if due > self.due:
            self.due = due

    def flush(self) -> None:
        """Evict the blocks due now."""
        due = self.due
        self.due = 0
        if due <= 0:
            return
        pieces = self.evictable.evict(due)
        lengths = self.lengths
        for segment, lo, hi in pieces:
            if lengths.get(segment) != hi:
                raise AssertionError(f"evicting offsets [{lo}, {hi}) of segment {segment} "
                                     f"below its cached length {lengths.get(segment)}")
            if lo:
                lengths[segment] = lo
            else:
                del lengths[segment]
            self.blocks_evicted += hi - lo
        if self.host is not None:
            self.host.write(pieces)

    def sync(self, used_blocks: int) -> None:
        """:meth:`allocate` and :meth:`flush` at once."""
        self.allocate(used_blocks)
        self.flush()

    def evict_all(self) -> None:
        """Evict every evictable block (an allocation found no free block: vLLM preempts only
        after that)."""
        self.due = self.evictable.count
        self.flush()

    def check_invariants(self, used_blocks: int) -> None:
        """Raise ``AssertionError`` when the cache's bookkeeping is inconsistent (tests)."""
        self.evictable.check()
        assert 0 <= self.due <= self.evictable.count, f"{self.due} blocks due"
        assert self.evictable.count - self.due + used_blocks <= self.num_blocks, (
            f"{used_blocks} blocks in use + {self.evictable.count} evictable - {self.due} due "
            f"> {self.num_blocks}")
        distinct = 0
        for segment, held in self.holders.items():
            assert held and held == sorted(held) and held[0] > 0, f"holders of {segment}"
            assert held[-1] <= self.lengths.get(segment, 0), f"hold beyond cache in {segment}"
            distinct += held[-1]
        assert distinct == self.held_distinct, f"held_distinct {self.held_distinct} != {distinct}"
        assert self.held_refs >= self.held_distinct, "fewer references than referenced blocks"
        for segment, length in self.lengths.items():
            held = self.holders.get(segment)
            top = held[-1] if held else 0
            runs = sorted((run[3], run[4]) for run in self.evictable.runs(segment))
            covered = top
            for lo, hi in runs:
                assert lo == covered, f"segment {segment}: evictable runs leave a gap at {covered}"
                covered = hi
            assert covered == length, f"segment {segment}: cached {length}, accounted {covered}"
        for segment in self.holders:
            assert segment in self.lengths, f"held segment {segment} not cached"
