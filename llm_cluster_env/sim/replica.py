"""One model replica: vLLM-style continuous batching over a paged KV cache.

Scheduling, at every iteration boundary (``start_batch``):

1. **KV check.** Every decoding request needs a cache slot for the token it is about to
   process; when the blocks needed exceed capacity, the most recently admitted request is
   preempted: its blocks are freed and it goes back to the *front* of the waiting queue, to be
   recomputed (prompt + tokens generated so far are prefilled again) when readmitted.
2. **Admission**, FCFS from the head of the waiting queue, while the batch has fewer than
   ``max_batch_size`` requests and the free blocks minus the request's prompt blocks stay at
   or above the watermark. Without chunked prefill a whole prompt runs in one iteration and the
   prompts admitted together may not exceed the token budget (a longer prompt runs alone); with
   chunked prefill (Sarathi) decodes take one token each and prompt chunks fill the rest of the
   budget, a long prompt spanning several iterations.
3. **Batch**: the admitted prefill chunks plus one decode token for every decoding request.
   The iteration time comes from :class:`~llm_cluster_env.sim.latency.IterationTimeModel`.

At the end of an iteration (``end_batch``) each decoding request has one more token; a request
whose prefill completes emits its first token (TTFT) in that same iteration; a request that has
all its output tokens finishes and frees its blocks.

**Jump mode.** When an iteration has no prefill work and no waiting request can be admitted
before a request finishes, the replica is in a *pure-decode stretch*: the batch is constant, the
context grows by ``B`` tokens per iteration and the iteration time is
``base(B) + beta * context``, so ``k`` iterations take
``k * base(B) + beta * (k * C0 + B * k * (k - 1) / 2)`` seconds. ``start_batch`` then plans the
whole stretch at once, up to the next completion or the first iteration that would exhaust the
KV cache. An arrival dispatched here mid-stretch cuts the stretch at the first iteration boundary
after it (``on_dispatch``). The result is identical, up to floating-point rounding, to simulating
every iteration (``jump=False``), which the tests check.

KV accounting in closed form: a decoding request with prompt ``p`` and ``g`` generated tokens
needs ``ceil((p + g) / block_size)`` blocks. With ``g = clock - offset`` that is
``ceil((clock - r) / block_size)`` for ``r = offset - p``, so the blocks of all decoding requests
follow from ``B``, ``sum(r)`` and how many requests have each residue ``r mod block_size``.
"""

from __future__ import annotations

import math
from collections import deque
from heapq import heappop, heappush

from llm_cluster_env.config import ReplicaConfig
from llm_cluster_env.sim.request import Request, RequestState

WAITING = RequestState.WAITING
PREFILLING = RequestState.PREFILLING
DECODING = RequestState.DECODING
FINISHED = RequestState.FINISHED


class SimulationError(RuntimeError):
    """The simulator reached a state its invariants forbid (a bug, or an impossible config)."""


class Replica:
    """A replica's queue, batch and KV cache.

    :param replica_id: index in the cluster.
    :param config: batching and memory settings.
    :param latency: iteration-time model (``decode_base_time``, ``decode_time_per_context_token``,
        ``iteration_time``).
    :param num_blocks: KV-cache capacity (blocks of ``config.block_size`` tokens).
    :param max_model_len: the model's context length (tokens); caps the default token budget.
    :param jump: advance pure-decode stretches in closed form.
    """

    def __init__(self, replica_id: int, config: ReplicaConfig, latency, num_blocks: int,
                 max_model_len: int, jump: bool = True) -> None:
        self.id = replica_id
        self.config = config
        self.latency = latency
        self.jump = jump
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self.watermark_blocks = int(config.watermark * num_blocks)
        self.max_batch_size = config.max_batch_size
        self.chunked_prefill = config.chunked_prefill
        if config.max_num_batched_tokens is not None:
            self.token_budget = config.max_num_batched_tokens
        else:
            self.token_budget = 512 if config.chunked_prefill else max_model_len
        self._beta = latency.decode_time_per_context_token
        self._base = latency.decode_base_time
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
        self._batch_chunks: list[tuple[Request, int]] = []
        self._stretch_base = 0.0  # base(B) of the pure-decode stretch (seconds)
        self._stretch_ctx0 = 0  # decode context tokens at the stretch's first iteration
        self._stretch_batch = 0
        self.event_version = 0
        # statistics
        self.busy_time = 0.0
        self.batch_time = 0.0  # integral of batch size over busy time (request-seconds)
        self._batch_size = 0
        self.num_iterations = 0
        self.num_preemptions = 0
        self.num_dispatched = 0
        self.num_completed = 0
        self.tokens_generated = 0

    @property
    def max_request_tokens(self) -> int:
        """Largest prompt + output (tokens) this replica can always finish: admission needs the
        prompt's blocks above the watermark, the last decode step needs ``p + o - 1`` slots."""
        return (self.num_blocks - self.watermark_blocks) * self.block_size

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
        self.waiting.append(req)
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
        """Free a running request's blocks and put it back at the front of the queue."""
        if req.state == DECODING:
            self._leave_decoding(req)
            self._generated_not_decoding += req.generated
        else:  # PREFILLING: progress is lost
            self.prefill_blocks -= req.blocks
            self.prefilling.remove(req)
            self.pending_prefill_tokens += req.prefilled
        req.blocks = 0
        req.prefilled = 0
        req.prefill_tokens = req.prompt_tokens + req.generated
        if req.state == DECODING:
            self.pending_prefill_tokens += req.prefill_tokens
        req.state = WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def start_batch(self, now: float) -> float | None:
        """Schedule the next iteration (or pure-decode stretch) at ``now``.

        Returns its end time, or ``None`` when there is nothing to run (the replica idles).
        """
        self.start_pending = False
        clock = self.clock
        blocks_total = self.num_blocks
        # 1. make room for every decoding request's next token
        used = self.decode_blocks(clock) + self.prefill_blocks
        while used > blocks_total:
            if len(self.running) <= 1:
                raise SimulationError(
                    f"replica {self.id}: one request needs {used} KV blocks of {blocks_total}")
            _, victim = self.running.popitem()
            self._preempt(victim)
            used = self.decode_blocks(clock) + self.prefill_blocks

        # 2. prefill work: continue chunked prefills, then admit FCFS
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
        if waiting:
            bs = self.block_size
            free = blocks_total - used
            scheduled_tokens = 0
            while waiting and len(self.running) < self.max_batch_size:
                req = waiting[0]
                need = -(-req.prefill_tokens // bs)
                if free - need < self.watermark_blocks:
                    break
                if self.chunked_prefill:
                    if budget <= 0:
                        break
                    chunk = min(req.prefill_tokens, budget)
                else:
                    chunk = req.prefill_tokens
                    if scheduled_tokens and scheduled_tokens + chunk > budget:
                        break
                    scheduled_tokens += chunk
                budget -= chunk
                waiting.popleft()
                free -= need
                req.state = PREFILLING
                req.blocks = need
                req.prefilled = 0
                self.prefill_blocks += need
                req.admit_seq = self._admit_counter
                self._admit_counter += 1
                self.running[req.admit_seq] = req
                self.prefilling.append(req)
                if req.first_scheduled_time < 0.0:
                    req.first_scheduled_time = now
                chunks.append((req, chunk))

        # 3. the batch
        batch = self.num_decoding
        if not chunks and not batch:
            if self.running or waiting:
                raise SimulationError(
                    f"replica {self.id}: requests present but nothing can run at t={now}")
            self.busy = False
            return None
        context = batch * clock - self._sum_r
        self.busy = True
        self.batch_start = now
        self._batch_chunks = chunks
        self._batch_size = batch + len(chunks)
        if chunks:
            self._batch_pure = False
            self.batch_iterations = 1
            self.batch_end = now + self.latency.iteration_time(
                batch, context, [(chunk, req.prefilled) for req, chunk in chunks])
            return self.batch_end
        self._batch_pure = True
        self._stretch_base = self._base(batch)
        self._stretch_ctx0 = context
        self._stretch_batch = batch
        iterations = 1
        if self.jump:
            heap = self._finish_heap
            while heap[0][2].state != DECODING or heap[0][2].admit_seq != heap[0][1]:
                heappop(heap)  # stale entry of a preempted request
            iterations = min(heap[0][0] - clock,
                             self._iterations_before_kv_exhaustion(clock, blocks_total - used))
        self.batch_iterations = iterations
        self.batch_end = now + self._stretch_duration(iterations)
        return self.batch_end

    def end_batch(self, now: float) -> list[Request]:
        """Apply the batch in flight, which ends at ``now``; return the requests that finished."""
        self.busy = False
        iterations = self.batch_iterations
        self.busy_time += now - self.batch_start
        self.batch_time += (now - self.batch_start) * self._batch_size
        self.num_iterations += iterations
        self.tokens_generated += iterations * self.num_decoding
        self.clock += iterations
        clock = self.clock
        finished: list[Request] = []
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
        req.finish_time = now
        del self.running[req.admit_seq]
        self.active_output_tokens -= req.output_tokens
        self.num_completed += 1

    # ------------------------------------------------------------ observation
    def generated_tokens_active(self, clock: int) -> int:
        """Output tokens already produced by the unfinished requests here, as of ``clock``."""
        return self.num_decoding * clock - self._sum_offset + self._generated_not_decoding

    def check_invariants(self, now: float) -> None:
        """Raise :class:`SimulationError` if the bookkeeping is inconsistent (tests, debugging)."""
        clock = self.clock_at(now)
        used = self.decode_blocks(clock) + self.prefill_blocks
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
