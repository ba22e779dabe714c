"""One model replica: continuous batching over a paged KV cache, under one of three policies.

A replica holds an FCFS waiting queue, the running requests (each holding KV blocks of
``block_size`` tokens) and at most one batch in flight. At every iteration boundary
(``start_batch``) it forms the next batch; when the batch ends (``end_batch``) every decoding
request in it has one more output token, a request whose prefill completes emits its first token
in that same iteration (TTFT), and a request with all its output tokens finishes and frees its
blocks. The iteration time comes from :class:`~llm_cluster_env.sim.latency.IterationTimeModel`.

Batching policies (``ReplicaConfig.batching``)
----------------------------------------------
``mixed_chunked`` (default; today's vLLM with chunked prefill, Sarathi-Serve):

1. **KV check.** Every decoding request needs a slot for the token it is about to process; while
   the blocks needed exceed capacity, the most recently admitted request is preempted: its blocks
   are freed and it goes back to the *front* of the waiting queue, to be recomputed (prompt +
   tokens generated so far, prefilled again) when readmitted.
2. **Batch.** Every decoding request takes one token of the budget
   (``max_num_batched_tokens``, default 2048); unfinished prefills continue, then waiting
   requests are admitted FCFS while the batch has fewer than ``max_batch_size`` requests, the
   free blocks minus the request's prompt blocks stay at or above the watermark, and budget is
   left: prompt chunks fill the rest of the budget, a long prompt spanning several iterations.

``mixed``: the same without chunking: a whole prompt runs in one iteration, together with the
decodes, and the prompts admitted together may not exceed the budget (a longer prompt runs alone).

``vllm_v0`` (vLLM before chunked prefill, as Vidur's vLLM scheduler models it):

1. **Prefill first.** Walk the waiting queue FCFS and admit while (a) the request's prompt blocks
   ``ceil(prefill_tokens / block_size)`` leave at least the watermark free
   (``int(watermark * num_blocks)``, counted against the blocks currently *allocated*), (b) the
   padded budget holds: ``len(batch) * max(prefill tokens in batch) <= max_num_batched_tokens``,
   (c) fewer than ``max_batch_size`` requests hold KV memory. Stop at the first failure. If any
   request was admitted, the batch is **prefill-only**: decodes wait.
2. **Otherwise a decode-only batch** of the running requests, oldest arrival first. Before its
   turn each request must find one free block (no watermark; vLLM v0's ``can_append_slots`` and
   Vidur check this even for a request that needs no new block), and takes a new block when its
   processed tokens (prompt + generated) pass its allocated blocks, i.e. every ``block_size``
   tokens. If no block is free, the *newest* running request not yet in this batch is preempted
   (all blocks freed, reset so prompt + generated tokens are recomputed as one prefill, put at the
   front of the waiting queue, so victims keep their arrival order there); with no other victim
   the request preempts itself.
3. No chunking; prefill and decode never share a batch; no CPU overhead by default
   (``build_replica`` passes 0), the next batch starts when the previous one ends. The KV capacity
   follows Vidur's memory rule (:func:`~llm_cluster_env.hardware.vidur_kv_cache_blocks`).

**Jump mode.** When an iteration has no prefill work and no waiting request can be admitted
before a request finishes, the replica is in a *pure-decode stretch*: the batch is constant, the
context grows by ``B`` tokens per iteration and the iteration time is
``base(B) + beta * context``, so ``k`` iterations take
``k * base(B) + beta * (k * C0 + B * k * (k - 1) / 2)`` seconds. ``start_batch`` then plans the
whole stretch at once, up to the next completion or the first iteration whose KV need would
trigger a preemption check (above capacity; for ``vllm_v0`` at capacity, where the one-free-block
rule can bite). An arrival dispatched here mid-stretch cuts the stretch at the first iteration
boundary after it (``on_dispatch``). The result is identical, up to floating-point rounding, to
simulating every iteration (``jump=False``), which the tests check for every policy.

**Prefix caching** (``ReplicaConfig.prefix_caching``, ``mixed`` and ``mixed_chunked`` only)
follows vLLM's automatic prefix caching (:mod:`llm_cluster_env.sim.prefix_cache`). At admission
the request's longest cached prefix (whole blocks, at most ``prefill_tokens - 1`` tokens so at
least one token is computed, as vLLM does) is referenced instead of computed: the request
allocates only the rest, taking evictable hit blocks costs free capacity, and its prefill starts
after the hit (``prefilled`` = hit tokens; the chunks' attention still spans the whole context,
the prior context of a chunk being everything before it). The blocks a chunk computes are
registered when its iteration ends; generated blocks when the request finishes or is
preempted, after which all its blocks stay cached until evicted. With the host tier
(``host_cache``), blocks evicted from the GPU go to host memory, and a prefix that continues
there is loaded at ``host_pcie_gb_s`` instead of computed, the transfer adding to the time of
the iteration that runs the request's first chunk. ``vllm_v0`` (Vidur's vLLM v0 model, which
has no prefix cache) refuses the switch: it must stay exactly Vidur's scheduler. Jump mode is
unchanged: blocks are only evicted (never freed) during a pure-decode stretch and the LRU
order cannot change in it, so evicting lazily at the end of the stretch, or whenever the cache
is read, evicts exactly the blocks iteration-by-iteration simulation evicts.

KV accounting in closed form: a decoding request with prompt ``p`` and ``g`` generated tokens
needs ``ceil((p + g) / block_size)`` blocks for its next iteration. With ``g = clock - offset``
(``clock`` counts the iterations that carried decodes) that is ``ceil((clock - r) / block_size)``
for ``r = offset - p``, so the blocks of all decoding requests follow from ``B``, ``sum(r)`` and
how many requests have each residue ``r mod block_size``; the blocks they currently hold are the
same expression at ``clock - 1``.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from llm_cluster_env.hardware import servable_request_tokens
from llm_cluster_env.sim.prefix_cache import HostCache, PrefixCache
from llm_cluster_env.sim.request import Request, RequestState

if TYPE_CHECKING:  # the simulator reads configs; it never imports the config layer at run time
    from llm_cluster_env.config import ReplicaConfig

WAITING = RequestState.WAITING
PREFILLING = RequestState.PREFILLING
DECODING = RequestState.DECODING
FINISHED = RequestState.FINISHED


#: ``mixed_chunked`` token budget when ``max_num_batched_tokens`` is not set (tokens).
DEFAULT_CHUNKED_TOKEN_BUDGET = 2048


class SimulationError(RuntimeError):
    """The simulator reached a state its invariants forbid (a bug, or an impossible config)."""


class Replica:
    """A replica's queue, batch and KV cache.

    :param replica_id: index in the cluster.
    :param config: batching and memory settings.
    :param latency: iteration-time model (``decode_segment``, ``iteration_time``).
    :param num_blocks: KV-cache capacity (blocks of ``config.block_size`` tokens).
    :param max_model_len: the model's context length (tokens); the default token budget of
        ``mixed`` and ``vllm_v0``.
    :param jump: advance pure-decode stretches in closed form.
    :param host_cache: the host-memory tier behind the prefix cache (``None``: none).
    """

    def __init__(self, replica_id: int, config: ReplicaConfig, latency, num_blocks: int,
                 max_model_len: int, jump: bool = True,
                 host_cache: HostCache | None = None) -> None:
        self.id = replica_id
        self.config = config
        self.latency = latency
        self.jump = jump
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.watermark_blocks = int(config.watermark * num_blocks)
        self.max_batch_size = config.max_batch_size
        self.batching = config.batching
        self.chunked_prefill = config.batching == "mixed_chunked"
        self._vllm_v0 = config.batching == "vllm_v0"
        if config.max_num_batched_tokens is not None:
            self.token_budget = config.max_num_batched_tokens
        else:
            self.token_budget = DEFAULT_CHUNKED_TOKEN_BUDGET if self.chunked_prefill else max_model_len
        if self._vllm_v0 and self.token_budget < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.token_budget} is below the model's context length "
                f"{max_model_len}: with batching='vllm_v0' (no chunking) a long prompt could "
                "never be scheduled; vLLM v0 rejects this too")
        self._beta = 0.0  # s per context token of the pure-decode stretch in flight
        self.cache: PrefixCache | None = None
        if config.prefix_caching:
            if self._vllm_v0:
                raise ValueError("prefix_caching=True: not available with batching='vllm_v0' "
                                 "(Vidur's vLLM v0 model has no prefix cache); use "
                                 "'mixed_chunked' or 'mixed'")
            self.cache = PrefixCache(num_blocks, host_cache)
        elif host_cache is not None:
            raise ValueError("a host cache tier needs prefix_caching=True")
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the replica (start of an episode)."""
        bs = self.block_size
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # admit_seq -> request, in admission order
        self.prefilling: list[Request] = []  # admitted, prefill not finished, admission order
        self.clock = 0  # iterations completed
        self._admit_counter = 0
        # decoding set aggregates
        self.num_decoding = 0
        self._sum_r = 0
        self._sum_offset = 0
        self._residues = [0] * bs  # decoding requests per value of r mod block_size
        self._sum_residue = 0  # sum of r mod block_size over decoding requests
        self._finish_heap: list[tuple[int, int, Request]] = []
        self.prefill_blocks = 0  # blocks held by PREFILLING requests
        # aggregates for observations
        self.pending_prefill_tokens = 0  # prompt/recompute tokens not yet prefilled
        self.active_output_tokens = 0  # sum of output_tokens over unfinished requests here
        self._generated_not_decoding = 0  # sum of generated over WAITING/PREFILLING here
        # the batch in flight
        self.busy = False
        self.start_pending = False
        self.batch_start = 0.0
        self.batch_end = 0.0
        self.batch_iterations = 0
        self._batch_pure = True
        self._batch_decodes = False  # the batch in flight advances the decoding requests
        self._batch_chunks: list[tuple[Request, int]] = []
        self._stretch_base = 0.0  # base(B) of the pure-decode stretch (seconds)
        self._stretch_ctx0 = 0  # decode context tokens at the stretch's first iteration
        self._stretch_batch = 0
        self.event_version = 0
        #: Bumped at every change of this replica's state (dispatch, batch start, batch end, a
        #: stretch cut short): observation caches keyed on it stay valid while it is unchanged.
        self.version = getattr(self, "version", 0) + 1
        #: Bumped whenever a running request joins, leaves or changes state (the running
        #: requests' prompts, decode offsets and generated counts are fixed in between).
        self.running_version = getattr(self, "running_version", 0) + 1
        # statistics
        self.busy_time = 0.0
        self.batch_time = 0.0  # integral of batch size over busy time (request-seconds)
        self._batch_size = 0
        self.num_iterations = 0
        self.num_preemptions = 0
        self.num_dispatched = 0
        self.num_completed = 0
        self.tokens_generated = 0
        # prefix caching statistics (first admissions: prompt blocks and their hits)
        self.prompt_blocks = 0  # ceil(prompt / block_size) over first admissions
        self.prompt_tokens_admitted = 0
        self.hit_blocks = 0  # of prompt_blocks, found cached (GPU or host)
        self.host_hit_blocks = 0  # of hit_blocks, loaded from the host tier
        self.prefill_tokens_saved = 0  # hit tokens over every admission, recomputes included
        self.prefill_tokens_computed = 0  # prompt and recompute tokens prefilled
        self._load_s = 0.0  # host-tier transfers owed by the batch being formed (seconds)
        if self.cache is not None:
            self.cache.reset()

    @property
    def max_request_tokens(self) -> int:
        """Largest prompt + output (tokens) this replica can always finish: admission needs the
        prompt's blocks above the watermark, the last decode step needs ``p + o - 1`` slots.
        Under ``vllm_v0`` a lone request must also never hold every block before a decode step
        (the one-free-block rule would make it preempt itself forever): ``p + o - 2`` tokens
        fit in ``num_blocks - 1`` blocks."""
        return servable_request_tokens(self.num_blocks, self.block_size, self.config.watermark,
                                       one_free_block=self._vllm_v0)

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    # ------------------------------------------------------------ KV in closed form
    def decode_blocks(self, clock: int) -> int:
        """KV blocks the decoding requests need for an iteration starting at ``clock``.

        ``sum_i ceil((clock - r_i) / bs) = (B * clock - sum(r) + pad) / bs`` with
        ``pad = sum_i ((r_i - clock) mod bs) = sum(r mod bs) - B * s + bs * #{i: r_i mod bs < s}``
        for ``s = clock mod bs``: O(1) but for a slice sum over at most ``bs`` counters.
        """
        batch = self.num_decoding
        if not batch:
            return 0
        bs = self.block_size
        shift = clock % bs
        pad = self._sum_residue - batch * shift + bs * sum(self._residues[:shift])
        return (batch * clock - self._sum_r + pad) // bs

    def _iterations_before_kv_exhaustion(self, clock: int, headroom: int) -> int:
        """Iterations from ``clock`` that fit before the decoding set's block growth exceeds
        ``headroom`` free blocks (>= 1 when headroom >= 0 at ``clock``)."""
        batch = self.num_decoding
        bs = self.block_size
        periods, left = divmod(headroom, batch)
        grown = 0
        residues = self._residues
        for step in range(1, bs + 1):
            grown += residues[(clock + step - 1) % bs]
            if grown > left:
                return periods * bs + step
        raise SimulationError("block growth over one period must equal the batch size")

    # ---------------------------------------------------------- decoding set ops
    def _join_decoding(self, req: Request) -> None:
        req.state = DECODING
        self.running_version += 1
        offset = self.clock - req.generated
        req.decode_offset = offset
        r = offset - req.prompt_tokens
        self.num_decoding += 1
        self._sum_r += r
        self._sum_offset += offset
        residue = r % self.block_size
        self._residues[residue] += 1
        self._sum_residue += residue
        heappush(self._finish_heap, (offset + req.output_tokens, req.admit_seq, req))

    def _leave_decoding(self, req: Request) -> None:
        self.running_version += 1
        offset = req.decode_offset
        r = offset - req.prompt_tokens
        self.num_decoding -= 1
        self._sum_r -= r
        self._sum_offset -= offset
        residue = r % self.block_size
        self._residues[residue] -= 1
        self._sum_residue -= residue
        req.generated = self.clock - offset

    # ------------------------------------------------------------- dispatch
    def enqueue(self, req: Request) -> None:
        """Put a dispatched request at the back of the waiting queue."""
        req.replica_id = self.id
        req.state = WAITING
        if self.cache is not None and req.chain is not None:
            req.chain_ids = req.chain.ids
            req.chain_starts = req.chain.block_starts(self.block_size)
        self.waiting.append(req)
        self.version += 1
        self.pending_prefill_tokens += req.prefill_tokens
        self.active_output_tokens += req.output_tokens
        self.num_dispatched += 1

    def on_dispatch(self, now: float, queue_was_empty: bool) -> float | None:
        """Cut a pure-decode stretch at the first boundary after ``now`` so a request dispatched
        at ``now`` can be admitted there. Returns the new end time, or ``None`` if unchanged."""
        if not (self.busy and self._batch_pure and queue_was_empty and self.batch_iterations > 1):
            return None
        done = self.iterations_done_by(now)
        keep = done if done and self.batch_start + self._stretch_duration(done) == now else done + 1
        if keep >= self.batch_iterations:
            return None
        self.batch_iterations = keep
        self.batch_end = self.batch_start + self._stretch_duration(keep)
        self.event_version += 1
        self.version += 1
        return self.batch_end

    # ---------------------------------------------------------- timing helpers
    def _stretch_duration(self, k: int) -> float:
        """Seconds taken by the first ``k`` iterations of the current pure-decode stretch."""
        b = self._stretch_batch
        return k * self._stretch_base + self._beta * (k * self._stretch_ctx0 + b * k * (k - 1) // 2)

    def iterations_done_by(self, t: float) -> int:
        """Iterations of the batch in flight whose end is ``<= t``."""
        if not self.busy or t < self.batch_start:
            return 0
        if t >= self.batch_end:
            return self.batch_iterations
        if not self._batch_pure or self.batch_iterations == 1:
            return 0
        # Largest k with start + S(k) <= t, S quadratic in k; solve, then correct rounding
        # against the very expression the stretch uses.
        elapsed = t - self.batch_start
        qa = 0.5 * self._beta * self._stretch_batch
        qb = self._stretch_base + self._beta * self._stretch_ctx0 - qa
        if qa > 0.0:
            k = int((-qb + math.sqrt(qb * qb + 4.0 * qa * elapsed)) / (2.0 * qa))
        else:
            k = int(elapsed / qb)
        k = min(max(k, 0), self.batch_iterations - 1)
        start = self.batch_start
        while k > 0 and start + self._stretch_duration(k) > t:
            k -= 1
        while k + 1 < self.batch_iterations and start + self._stretch_duration(k + 1) <= t:
            k += 1
        return k

    def clock_at(self, t: float) -> int:
        """The iteration clock as of time ``t`` (iterations ending at or before ``t`` counted)."""
        if self.busy and self._batch_pure:
            return self.clock + self.iterations_done_by(t)
        return self.clock

    # ------------------------------------------------------------- scheduling
    def _preempt(self, req: Request) -> None:
        """Free a running request's blocks and put it back at the front of the queue (with
        prefix caching its computed blocks stay cached, so the recompute may hit them)."""
        self.running_version += 1
        del self.running[req.admit_seq]
        if req.state == DECODING:
            self._leave_decoding(req)
            self._generated_not_decoding += req.generated
            computed = req.prompt_tokens + req.generated - 1
        else:  # PREFILLING: progress is lost
            self.prefill_blocks -= req.blocks
            self.prefilling.remove(req)
            self.pending_prefill_tokens += req.prefilled
            computed = req.prefilled
            req.load_s = 0.0
        if req.chain_ids is not None:
            self._release_cached(req, computed)
        req.blocks = 0
        req.prefilled = 0
        req.prefill_tokens = req.prompt_tokens + req.generated
        if req.state == DECODING:
            self.pending_prefill_tokens += req.prefill_tokens
        req.state = WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release_cached(self, req: Request, computed_tokens: int) -> None:
        """Register the request's full blocks of its ``computed_tokens`` and drop its
        references (the blocks stay cached)."""
        full = computed_tokens // self.block_size
        if full < req.cache_refs:
            full = req.cache_refs
        self.cache.release(req.chain_ids, req.chain_starts, req.cache_refs, full)
        req.cache_refs = 0

    def blocks_in_use(self, clock: int) -> int:
        """KV blocks physically in use when the decoding requests hold their blocks for an
        iteration starting at ``clock``: nominal blocks minus what prefix sharing saves."""
        used = self.decode_blocks(clock) + self.prefill_blocks
        if self.cache is not None:
            used -= self.cache.held_refs - self.cache.held_distinct
        return used

    def held_blocks(self, now: float, clock: int | None = None) -> int:
        """KV blocks physically in use at ``now`` (a decoding batch in flight holds the slots
        of its current iteration; between batches, those of the last one); ``clock`` is
        ``clock_at(now)`` when the caller has it."""
        if clock is None:
            clock = self.clock_at(now)
        return self.blocks_in_use(clock if self.busy and self._batch_decodes else clock - 1)

    def sync_cache(self, now: float) -> None:
        """Apply the evictions that the block allocations up to ``now`` imply (a no-op
        without prefix caching)."""
        if self.cache is not None:
            self.cache.sync(self.held_blocks(now))

    def cached_prefix_tokens(self, chain, prompt_tokens: int, now: float) -> int:
        """Tokens of a prompt with this chain whose KV is cached here at ``now`` (GPU, then
        the host tier; whole blocks, at most the prompt's full blocks)."""
        cache = self.cache
        if cache is None or chain is None:
            return 0
        self.sync_cache(now)
        ids, starts = chain.ids, chain.block_starts(self.block_size)
        limit = prompt_tokens // self.block_size
        hit, _ = cache.match(ids, starts, limit)
        if cache.host is not None and hit < limit:
            hit += cache.host.match(ids, starts, hit, limit)
        return hit * self.block_size

    def _admit(self, req: Request, blocks: int, now: float) -> None:
        """Move the head of the waiting queue into the running set, holding ``blocks``."""
        self.waiting.popleft()
        self.running_version += 1
        req.state = PREFILLING
        req.blocks = blocks
        req.prefilled = 0
        self.prefill_blocks += blocks
        req.admit_seq = self._admit_counter
        self._admit_counter += 1
        self.running[req.admit_seq] = req
        self.prefilling.append(req)
        if req.first_scheduled_time < 0.0:
            req.first_scheduled_time = now

    def start_batch(self, now: float) -> float | None:
        """Schedule the next iteration (or pure-decode stretch) at ``now``.

        Returns its end time, or ``None`` when there is nothing to run (the replica idles).
        """
        self.start_pending = False
        self.version += 1
        if self._vllm_v0:
            chunks = self._admit_vllm_v0(now)
            if chunks:
                return self._launch(now, chunks, decode_batch=0, headroom=0)
            self._make_room_vllm_v0()
            if not self.num_decoding:
                # Every request was preempted (only possible for a request over
                # max_request_tokens): Vidur would idle until the next arrival; admitting the
                # recompute at once is what vLLM v0 does.
                chunks = self._admit_vllm_v0(now)
                return self._launch(now, chunks, decode_batch=0, headroom=0)
            # the stretch may run while every request still finds a free block before its turn
            headroom = self.num_blocks - 1 - self.decode_blocks(self.clock)
            return self._launch(now, [], self.num_decoding, headroom)
        used = self.blocks_in_use(self.clock)
        if used > self.num_blocks:
            used = self._make_room_mixed(used)
        if self.cache is not None:
            self.cache.allocate(used)
        chunks = self._admit_mixed(now, used) if self.waiting or self.prefilling else []
        return self._launch(now, chunks, self.num_decoding, self.num_blocks - used)

    def _make_room_mixed(self, used: int) -> int:
        """Preempt the latest admitted requests until every decoding request has a slot for its
        next token; ``used`` is the blocks needed now (decode needs + prefill holdings). Returns
        the blocks needed after the preemptions."""
        clock = self.clock
        cache = self.cache
        while used > self.num_blocks:
            if len(self.running) <= 1:
                raise SimulationError(
                    f"replica {self.id}: one request needs {used} KV blocks of {self.num_blocks}")
            if cache is not None:
                cache.evict_all()  # allocation evicts every cached block before preempting
            self._preempt(next(reversed(self.running.values())))
            used = self.blocks_in_use(clock)
        return used

    def _admit_mixed(self, now: float, used: int) -> list[tuple[Request, int]]:
        """Prefill work of a ``mixed``/``mixed_chunked`` iteration: continue chunked prefills,
        then admit FCFS. Returns ``(request, chunk tokens)`` pairs."""
        chunks: list[tuple[Request, int]] = []
        budget = self.token_budget
        if self.chunked_prefill:
            budget -= self.num_decoding
            for req in self.prefilling:
                if budget <= 0:
                    break
                chunk = min(req.prefill_tokens - req.prefilled, budget)
                chunks.append((req, chunk))
                budget -= chunk
        waiting = self.waiting
        bs = self.block_size
        free = self.num_blocks - used
        scheduled_tokens = 0
        cache = self.cache
        while waiting and len(self.running) < self.max_batch_size:
            req = waiting[0]
            need = -(-req.prefill_tokens // bs)
            cost = need
            hit = loaded = 0
            if req.chain_ids is not None:
                limit = (req.prefill_tokens - 1) // bs  # at least one token is computed
                hit, taken = cache.match(req.chain_ids, req.chain_starts, limit)
                if cache.host is not None and hit < limit:
                    loaded = cache.host.match(req.chain_ids, req.chain_starts, hit, limit)
                cost = need - hit + taken
            if free - cost < self.watermark_blocks:
                break
            skipped = (hit + loaded) * bs
            remaining = req.prefill_tokens - skipped
            if self.chunked_prefill:
                if budget <= 0:
                    break
                chunk = min(remaining, budget)
            else:
                chunk = remaining
                if scheduled_tokens and scheduled_tokens + chunk > budget:
                    break
                scheduled_tokens += chunk
            budget -= chunk
            free -= cost
            self._admit(req, need, now)
            if cache is not None:
                self._take_cached(req, hit, loaded)
                cache.allocate(self.num_blocks - free)
            chunks.append((req, chunk))
        return chunks

    def _take_cached(self, req: Request, hit: int, loaded: int) -> None:
        """Reference the request's ``hit`` cached blocks, load ``loaded`` more from the host
        tier, and start its prefill after them."""
        cache = self.cache
        bs = self.block_size
        if hit:
            cache.hold(req.chain_ids, req.chain_starts, 0, hit)
            req.cache_refs = hit
        skipped = (hit + loaded) * bs
        req.prefilled = skipped
        self.pending_prefill_tokens -= skipped
        self.prefill_tokens_saved += skipped
        if loaded:
            cache.host.touch(req.chain_ids, req.chain_starts, hit, hit + loaded)
            req.load_s = loaded * cache.host.seconds_per_block
            self._load_s += req.load_s
        if req.cached_tokens < 0:  # first admission: the request's hit statistics
            req.cached_tokens = skipped
            req.host_tokens = loaded * bs
            self.prompt_tokens_admitted += req.prompt_tokens
            self.prompt_blocks += -(-req.prompt_tokens // bs)
            self.hit_blocks += hit + loaded
            self.host_hit_blocks += loaded

    def _admit_vllm_v0(self, now: float) -> list[tuple[Request, int]]:
        """The prefill-only batch of ``vllm_v0`` (empty when the queue head cannot start)."""
        waiting = self.waiting
        if not waiting:
            return []
        bs = self.block_size
        held = self.decode_blocks(self.clock - 1) + self.prefill_blocks
        free = self.num_blocks - held
        chunks: list[tuple[Request, int]] = []
        longest = 0
        while waiting:
            req = waiting[0]
            need = -(-req.prefill_tokens // bs)
            if free - need < self.watermark_blocks:
                break
            longest = max(longest, req.prefill_tokens)
            if (len(chunks) + 1) * longest > self.token_budget:
                break
            if len(self.running) >= self.max_batch_size or len(chunks) >= self.max_batch_size:
                break
            free -= need
            self._admit(req, need, now)
            chunks.append((req, req.prefill_tokens))
        return chunks

    def _make_room_vllm_v0(self) -> None:
        """Vidur's/vLLM v0's decode-batch walk: running requests oldest arrival first, each
        needing one free block before its turn, the newest not yet walked preempted otherwise.

        Needed only when the decoding set's blocks for this iteration reach capacity: below it
        every request finds a free block."""
        clock = self.clock
        total = self.num_blocks
        if self.decode_blocks(clock) < total:
            return
        bs = self.block_size
        order = sorted(self.running.values(), key=lambda r: (r.arrival_time, r.id))
        generated = [clock - r.decode_offset for r in order]
        held = [-(-(r.prompt_tokens + g - 1) // bs) for r, g in zip(order, generated)]
        allocated = sum(held)
        last = len(order)  # order[:last] are still running
        i = 0
        while i < last:
            while total - allocated < 1:
                last -= 1
                allocated -= held[last]
                self._preempt(order[last])
                if last == i:
                    break  # no other victim: it preempted itself
            if last == i:
                break
            req = order[i]
            allocated += -(-(req.prompt_tokens + generated[i]) // bs) - held[i]
            i += 1

    def _launch(self, now: float, chunks: list[tuple[Request, int]], decode_batch: int,
                headroom: int) -> float | None:
        """Start a batch of ``chunks`` plus ``decode_batch`` decodes; a pure-decode batch runs as
        a stretch while its block growth stays within ``headroom`` blocks (jump mode)."""
        if not chunks and not decode_batch:
            if self.running or self.waiting:
                raise SimulationError(
                    f"replica {self.id}: requests present but nothing can run at t={now}")
            self.busy = False
            return None
        clock = self.clock
        context = decode_batch * clock - self._sum_r if decode_batch else 0
        self.busy = True
        self.batch_start = now
        self._batch_chunks = chunks
        self._batch_decodes = decode_batch > 0
        self._batch_size = decode_batch + len(chunks)
        if chunks:
            self._batch_pure = False
            self.batch_iterations = 1
            self.batch_end = now + self.latency.iteration_time(
                decode_batch, context, [(chunk, req.prefilled) for req, chunk in chunks])
            if self._load_s:  # host-tier loads run before the iteration's forward pass
                self.batch_end += self._load_s
                self._load_s = 0.0
                for req, _ in chunks:
                    req.load_s = 0.0
            return self.batch_end
        self._batch_pure = True
        # base + beta * C holds while the mean context stays on one segment (ends at `end`)
        self._stretch_base, self._beta, end = self.latency.decode_segment(decode_batch, context)
        self._stretch_ctx0 = context
        self._stretch_batch = decode_batch
        iterations = 1
        if self.jump and headroom >= 0:
            heap = self._finish_heap
            while heap[0][2].state != DECODING or heap[0][2].admit_seq != heap[0][1]:
                heappop(heap)  # stale entry of a preempted request
            iterations = min(heap[0][0] - clock,
                             self._iterations_before_kv_exhaustion(clock, headroom))
            if end is not None:
                iterations = min(iterations, -(-(end - context) // decode_batch))
        self.batch_iterations = iterations
        self.batch_end = now + self._stretch_duration(iterations)
        return self.batch_end

    def end_batch(self, now: float) -> list[Request]:
        """Apply the batch in flight, which ends at ``now``; return the requests that finished."""
        self.busy = False
        self.version += 1
        iterations = self.batch_iterations
        cache = self.cache
        if cache is not None and iterations > 1:
            # evictions for the blocks a pure-decode stretch allocated after its first
            # iteration (start_batch synced the first; nothing else allocates in a batch)
            cache.allocate(self.blocks_in_use(self.clock + iterations - 1))
        self.busy_time += now - self.batch_start
        self.batch_time += (now - self.batch_start) * self._batch_size
        self.num_iterations += iterations
        finished: list[Request] = []
        if self._batch_decodes:
            self.tokens_generated += iterations * self.num_decoding
            self.clock += iterations
            clock = self.clock
            heap = self._finish_heap
            while heap and heap[0][0] <= clock:
                _, seq, req = heappop(heap)
                if req.state != DECODING or req.admit_seq != seq:
                    continue  # stale entry of a preempted request
                self._leave_decoding(req)
                self._finish(req, now)
                finished.append(req)
        for req, chunk in self._batch_chunks:
            req.prefilled += chunk
            self.pending_prefill_tokens -= chunk
            self.prefill_tokens_computed += chunk
            if req.chain_ids is not None:  # the blocks computed so far become cached
                full = req.prefilled // self.block_size
                if full > req.cache_refs:
                    cache.hold(req.chain_ids, req.chain_starts, req.cache_refs, full)
                    req.cache_refs = full
            if req.prefilled < req.prefill_tokens:
                continue
            # prefill done: this iteration emitted the next output token
            self.prefilling.remove(req)
            self.prefill_blocks -= req.blocks
            req.blocks = 0
            self._generated_not_decoding -= req.generated
            req.generated += 1
            self.tokens_generated += 1
            if req.first_token_time < 0.0:
                req.first_token_time = now
            if req.generated >= req.output_tokens:
                self._finish(req, now)
                finished.append(req)
            else:
                self._join_decoding(req)
        self._batch_chunks = []
        return finished

    def _finish(self, req: Request, now: float) -> None:
        req.state = FINISHED
        self.running_version += 1
        req.finish_time = now
        if req.chain_ids is not None:
            self._release_cached(req, req.prompt_tokens + req.generated - 1)
        del self.running[req.admit_seq]
        self.active_output_tokens -= req.output_tokens
        self.num_completed += 1

    # ------------------------------------------------------------ what-if copies
    def snapshot(self) -> Replica:
        """An independent copy of this replica's state (requests, queue, batch in flight, KV
        bookkeeping, statistics) sharing its configuration and iteration-time model, which are
        read-only. Much cheaper than ``copy.deepcopy``; a look-ahead simulates such copies."""
        new = Replica.__new__(Replica)
        new.__dict__.update(self.__dict__)
        copies = {id(r): r.clone() for r in self.waiting}
        copies.update((id(r), r.clone()) for r in self.running.values())
        new.waiting = deque(copies[id(r)] for r in self.waiting)
        new.running = {seq: copies[id(r)] for seq, r in self.running.items()}
        new.prefilling = [copies[id(r)] for r in self.prefilling]
        new._residues = list(self._residues)
        heap = [(key, seq, copies[id(r)]) for key, seq, r in self._finish_heap if id(r) in copies]
        heapify(heap)  # entries of requests no longer here were stale anyway
        new._finish_heap = heap
        new._batch_chunks = [(copies[id(r)], chunk) for r, chunk in self._batch_chunks]
        if self.cache is not None:  # holds no request objects, only identities and counts
            new.cache = copy.deepcopy(self.cache)
        return new

    def replace_output_lengths(self, length_of) -> None:
        """Give every unfinished request here the output length ``length_of(request,
        generated)`` (tokens, at least ``generated + 1``) and rebuild what depends on output
        lengths. For a what-if copy of the replica (look-ahead routing with estimated lengths);
        never call it on the simulator's own replica."""
        clock = self.clock
        total = 0
        heap = []
        for req in (*self.waiting, *self.running.values()):
            generated = clock - req.decode_offset if req.state == DECODING else req.generated
            length = int(length_of(req, generated))
            if length <= generated:
                raise ValueError(f"{req!r}: output length {length} <= {generated} generated")
            req.output_tokens = length
            total += length
            if req.state == DECODING:
                heap.append((req.decode_offset + length, req.admit_seq, req))
        heapify(heap)
        self._finish_heap = heap
        self.active_output_tokens = total
        self.version += 1
        self.running_version += 1

    # ------------------------------------------------------------ observation
    def generated_tokens_active(self, clock: int) -> int:
        """Output tokens already produced by the unfinished requests here, as of ``clock``."""
        return self.num_decoding * clock - self._sum_offset + self._generated_not_decoding

    def check_invariants(self, now: float) -> None:
        """Raise :class:`SimulationError` if the bookkeeping is inconsistent (tests, debugging)."""
        clock = self.clock_at(now)
        # blocks held: a decoding batch in flight holds its slots; between batches a decoding
        # request holds what its last iteration needed (the next need may exceed capacity until
        # the next batch start preempts)
        held_clock = clock if self.busy and self._batch_decodes else clock - 1
        used = self.blocks_in_use(held_clock)
        if used > self.num_blocks:
            raise SimulationError(f"replica {self.id}: {used} blocks in use > {self.num_blocks}")
        decoding = [r for r in self.running.values() if r.state == DECODING]
        if len(decoding) != self.num_decoding:
            raise SimulationError(f"replica {self.id}: decoding count drifted")
        exact = sum(-(-(r.prompt_tokens + clock - r.decode_offset) // self.block_size)
                    for r in decoding)
        if exact != self.decode_blocks(clock):
            raise SimulationError(f"replica {self.id}: closed-form blocks {self.decode_blocks(clock)}"
                                  f" != per-request sum {exact}")
        if self.prefill_blocks != sum(r.blocks for r in self.prefilling):
            raise SimulationError(f"replica {self.id}: prefill blocks drifted")
        if len(self.running) > self.max_batch_size:
            raise SimulationError(f"replica {self.id}: batch over its cap")
        if self.cache is not None:
            refs = sum(r.cache_refs for r in self.running.values())
            if refs != self.cache.held_refs:
                raise SimulationError(f"replica {self.id}: requests reference {refs} cached "
                                      f"blocks, the cache counts {self.cache.held_refs}")
            try:
                self.cache.check_invariants(used)
            except AssertionError as err:
                raise SimulationError(f"replica {self.id}: prefix cache: {err}") from None
