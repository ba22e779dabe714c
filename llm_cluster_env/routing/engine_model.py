"""Engine-model signals: what a request would cost on each replica, in seconds.

A router in front of real engines can know each replica's queue and running batch (requests,
prompt lengths, tokens generated so far, KV usage) and, from profiling, the replica's
iteration-time model. It cannot know output lengths; it can know the workload's length
distribution. From exactly that, :class:`EngineModel` estimates for a pending request with a
prompt of ``p`` tokens, on each replica:

``est_wait_s``
    time until the request's prefill starts;
``est_ttft_s``
    ``est_wait_s`` plus its own prefill: time to its first token;
``est_delta_s``
    the increase in total time in system the request causes there: its own end-to-end latency
    plus the slow-down it adds to the replica's other requests.

These are closed-form approximations of the engine's behaviour (the ``lookahead`` router
simulates it instead; :mod:`llm_cluster_env.routing.lookahead`). With ``B`` decoding requests of total
context ``C`` tokens, ``t_d = iteration_time(B, C)``; ``cap`` prefill tokens fit in one
iteration (``mixed_chunked``: the token budget minus ``B``; ``mixed`` and ``vllm_v0``: the
budget); ``T_pf(x)`` is ``ceil(x / cap)`` iterations each carrying a chunk of
``min(x, cap)`` tokens beside the decodes (``vllm_v0``: prefill-only iterations). Then

* ``wait = tau0 + max(T_pf(P), T_adm)``: ``tau0`` until the replica's next iteration boundary,
  the ``P`` prefill tokens already queued ahead (FCFS), and ``T_adm``, the time until enough
  requests finish to give the request a batch slot and KV blocks above the watermark: the
  ``k``-th smallest expected remaining decode length among the running requests times ``t_d``
  (and ``E[O] * t_d / B`` per completion beyond them);
* ``ttft = wait + T_pf(p)``;
* ``delta = ttft + B * (T_pf(p) - n_pf * t_d) + H * t' + B'' * H * (t' - t'')``: over the
  request's ``H = E[O | p] - 1`` decode iterations it decodes beside ``B'' = B + queued``
  co-runners (the running requests and those queued ahead). Each co-runner keeps its context
  growing by one token per iteration for its expected remaining tokens and is then replaced by
  a request of the workload's mean context (prompt plus half the output): the batch stays full
  in a steady state instead of keeping today's contexts for the whole horizon, which made
  replicas whose long requests are about to finish look cheap. ``t'`` is the decode iteration
  with ``B'' + 1`` requests at the co-runners' mean total context over the horizon plus the
  request's own mean context, ``t''`` the same without the request; the iteration-time model
  is non-decreasing in batch and context, so the co-runners' slow-down is never negative.
  Under ``vllm_v0`` the ``B`` decoding requests wait out the whole prefill.

Expected lengths come from :class:`OutputLengthPrior`: ``E[O | p]`` for the new request (mean
output of its prompt-length decile) and ``E[O - g | O > g]`` for a request that has produced
``g`` tokens (the distribution's mean residual length). With the oracle flag the true lengths
are used instead (an upper bound on what length prediction could give).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from llm_cluster_env.sim.request import RequestState

#: Per-replica feature names, in the order :meth:`EngineModel.estimate` returns them (seconds).
ENGINE_FEATURES = ("est_wait_s", "est_ttft_s", "est_delta_s")
#: Residual lengths are tabulated up to this many generated tokens (beyond: the last value).
RESIDUAL_TABLE_SIZE = 1 << 15
_PROMPT_BINS = 10
_DECODING = RequestState.DECODING


class OutputLengthPrior:
    """What a router can expect of output lengths, from a sample of the workload's
    ``(prompt, output)`` lengths (tokens).

    :param prompt_tokens: prompt lengths of the sample.
    :param output_tokens: output lengths of the sample (>= 1).
    """

    def __init__(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> None:
        prompt = np.asarray(prompt_tokens, dtype=np.float64)
        output = np.asarray(output_tokens, dtype=np.float64)
        if prompt.shape != output.shape or output.size == 0 or output.min() < 1:
            raise ValueError("OutputLengthPrior: needs matching non-empty samples, outputs >= 1")
        self.mean_output = float(output.mean())
        #: Mean context of a request over its life, prompt + half its output (tokens): what a
        #: decode batch's requests hold on average in a steady state.
        self.mean_context = float(prompt.mean() + 0.5 * output.mean())
        # E[O | prompt decile]
        edges = np.unique(np.quantile(prompt, np.linspace(0, 1, _PROMPT_BINS + 1)[1:-1]))
        self._prompt_edges = edges.tolist()
        bins = np.searchsorted(edges, prompt, side="right")
        self._output_by_bin = [float(output[bins == b].mean()) if np.any(bins == b)
                               else self.mean_output for b in range(len(edges) + 1)]
        # E[O - g | O > g] for g = 0 .. RESIDUAL_TABLE_SIZE - 1 (>= 1 token)
        ordered = np.sort(output)
        suffix = np.concatenate([np.cumsum(ordered[::-1])[::-1], [0.0]])
        g = np.arange(min(RESIDUAL_TABLE_SIZE, int(ordered[-1]) + 1), dtype=np.float64)
        first_longer = np.searchsorted(ordered, g, side="right")
        count = ordered.size - first_longer
        with np.errstate(invalid="ignore", divide="ignore"):
            residual = np.where(count > 0, suffix[first_longer] / np.maximum(count, 1) - g, 1.0)
        self._residual = np.maximum(residual, 1.0).tolist()
        #: ``E[O - g | O > g]`` for ``g = 0, 1, ...`` (the last entry holds beyond the table).
        self.residual_table = np.asarray(self._residual, dtype=np.float64)

    def expected_output(self, prompt_tokens: int) -> float:
        """``E[O | prompt]``: mean output length (tokens) of the prompt's decile."""
        return self._output_by_bin[bisect_right(self._prompt_edges, prompt_tokens)]

    def remaining(self, generated: int) -> float:
        """``E[O - g | O > g]``: expected tokens still to come (>= 1) after ``g`` generated."""
        table = self._residual
        return table[generated] if generated < len(table) else table[-1]

    @classmethod
    def from_generator(cls, generator) -> OutputLengthPrior:
        """The prior of a :class:`~llm_cluster_env.workload.generator.WorkloadGenerator`'s lengths
        (after its oversize policy)."""
        prompt, output = generator.length_sample()
        return cls(prompt, output)


class EngineModel:
    """Per-replica engine-model signals for a pending request (see the module docstring).

    :param prior: expected output lengths.
    :param oracle: use the requests' true output lengths instead of the prior.
    """

    def __init__(self, prior: OutputLengthPrior, oracle: bool = False) -> None:
        self.prior = prior
        self.oracle = oracle

    def estimate(self, replica, now: float, prompt_tokens: int, output_tokens: int = 0,
                 cached_tokens: int = 0, timing: tuple[int, float] | None = None
                 ) -> tuple[float, float, float]:
        """``(est_wait_s, est_ttft_s, est_delta_s)`` of a request with these lengths (tokens;
        ``output_tokens`` is read only with the oracle flag) on ``replica`` at ``now``;
        ``cached_tokens`` of its prompt need no prefill (prefix caching). ``timing`` is
        :func:`clock_and_boundary` of the replica at ``now`` when the caller has it."""
        prior = self.prior
        latency = replica.latency
        iteration_time = latency.iteration_time
        clock, tau0 = timing if timing is not None else clock_and_boundary(replica, now)
        batch = replica.num_decoding
        context = batch * clock - replica._sum_r if batch else 0
        t_dec = iteration_time(batch, context) if batch else 0.0
        v0 = replica.batching == "vllm_v0"
        budget = replica.token_budget
        cap = budget if (v0 or not replica.chunked_prefill) else max(budget - batch, 1)
        chunk_batch, chunk_context = (0, 0) if v0 else (batch, context)

        # Over our ``horizon`` decode iterations each co-runner keeps its context ``c``
        # growing for its ``m`` remaining tokens (at most the horizon), then is replaced by a
        # request of the workload's mean context (the batch keeps its size in a steady state).
        expected_out = float(output_tokens) if self.oracle else prior.expected_output(prompt_tokens)
        horizon = expected_out - 1.0 if expected_out > 1.0 else 0.0
        steady = prior.mean_context

        # remaining decode tokens of the running requests (expected, or true with the oracle),
        # and ``co_context``: their context tokens summed over our horizon, in one pass
        running = replica.running.values()
        remaining = []
        append = remaining.append
        co_context = 0.0
        table = prior._residual
        size = len(table)
        oracle = self.oracle
        for r in running:
            g = clock - r.decode_offset if r.state is _DECODING else r.generated
            if oracle:
                left = r.output_tokens - g
            else:
                left = table[g] if g < size else table[-1]
            append(left)
            m = left if left < horizon else horizon
            co_context += m * (r.prompt_tokens + g) + 0.5 * m * (m - 1.0) + (horizon - m) * steady

        # admission: a batch slot and KV blocks above the watermark for everything ahead + us
        num_running = len(remaining)
        used = replica.decode_blocks(clock) + replica.prefill_blocks
        ahead = replica.pending_prefill_tokens
        need_blocks = -(-(ahead + prompt_tokens) // replica.block_size)
        free_blocks = replica.num_blocks - used - replica.watermark_blocks
        completions = num_running + len(replica.waiting) + 1 - replica.max_batch_size
        if need_blocks > free_blocks and num_running:
            per_request = used / num_running if used > num_running else 1.0
            completions = max(completions, math.ceil((need_blocks - free_blocks) / per_request))
        admit_wait = 0.0
        if completions > 0 and t_dec > 0.0:
            remaining.sort()
            if completions <= num_running:
                admit_wait = remaining[completions - 1] * t_dec
            else:
                admit_wait = (remaining[-1] + (completions - num_running) * prior.mean_output
                              / (batch or 1)) * t_dec
        if ahead > 0:
            ahead_time = math.ceil(ahead / cap) * iteration_time(
                chunk_batch, chunk_context, ((ahead if ahead < cap else cap, 0),))
        else:
            ahead_time = 0.0
        wait = tau0 + (ahead_time if ahead_time > admit_wait else admit_wait)
        own = prompt_tokens - cached_tokens if prompt_tokens > cached_tokens else 1
        prefill_iterations = math.ceil(own / cap)
        own_prefill = prefill_iterations * iteration_time(
            chunk_batch, chunk_context, ((own if own < cap else cap, 0),))
        ttft = wait + own_prefill

        # own decoding, beside co-runners: the running requests and those queued ahead (admitted
        # first). Decode iterations are costed at the mean context over our horizon.
        queued = len(replica.waiting)
        co_batch = batch + queued
        if co_batch >= replica.max_batch_size:
            co_batch = replica.max_batch_size - 1
        delta = ttft
        if batch:
            if v0:
                delta += batch * own_prefill
            else:
                extra = own_prefill - prefill_iterations * t_dec
                delta += batch * extra if extra > 0.0 else 0.0
        if horizon > 0.0:
            if queued:
                fresh = ahead / queued if ahead > 0 else steady
                m = prior.mean_output if prior.mean_output < horizon else horizon
                co_context += queued * (m * fresh + 0.5 * m * (m - 1.0) + (horizon - m) * steady)
            mean_co = co_context / horizon
            mean_own = prompt_tokens + 0.5 * (horizon - 1.0)
            with_us = iteration_time(co_batch + 1, int(mean_co + mean_own + 0.5))
            delta += horizon * with_us
            if co_batch:  # the co-runners' iterations are longer while we decode beside them
                without_us = iteration_time(co_batch, max(int(mean_co + 0.5), 1))
                delta += co_batch * horizon * (with_us - without_us)
        return wait, ttft, delta

    def replica_terms(self, replica, clock: int,
                      requests: list[tuple] | None = None) -> tuple:
        """What :meth:`estimate` needs of ``replica`` at iteration clock ``clock`` that does
        not depend on the pending request or on the time within the iteration: a tuple
        ``(scalars, remaining, prompt_plus_generated)`` with ``scalars`` in
        :data:`TERM_FIELDS` order (tokens, blocks, requests, seconds), the running requests'
        expected (or, with the oracle, true) remaining decode tokens in admission order, and
        their prompt plus generated tokens (float64 arrays, the same order). ``requests`` is
        :func:`running_requests` of the replica when the caller keeps it."""
        iteration_time = replica.latency.iteration_time
        batch = replica.num_decoding
        context = batch * clock - replica._sum_r if batch else 0
        t_dec = iteration_time(batch, context) if batch else 0.0
        v0 = replica.batching == "vllm_v0"
        budget = replica.token_budget
        cap = budget if (v0 or not replica.chunked_prefill) else max(budget - batch, 1)
        chunk_batch, chunk_context = (0, 0) if v0 else (batch, context)
        if requests is None:
            requests = running_requests(replica)
        # plain Python: a replica runs tens of requests, too few for array calls to pay off
        remaining = []
        tokens = []
        if self.oracle:
            for decoding, offset, generated, prompt, output in requests:
                g = clock - offset if decoding else generated
                remaining.append(output - g)
                tokens.append(prompt + g)
        else:
            table = self.prior._residual
            size = len(table)
            last = table[-1]
            for decoding, offset, generated, prompt, _ in requests:
                g = clock - offset if decoding else generated
                remaining.append(table[g] if g < size else last)
                tokens.append(prompt + g)
        remaining = np.array(remaining, dtype=np.float64)
        tokens = np.array(tokens, dtype=np.float64)
        used = replica.decode_blocks(clock) + replica.prefill_blocks
        ahead = replica.pending_prefill_tokens
        if ahead > 0:
            ahead_time = math.ceil(ahead / cap) * iteration_time(
                chunk_batch, chunk_context, ((ahead if ahead < cap else cap, 0),))
        else:
            ahead_time = 0.0
        scalars = (batch, context, t_dec, cap, chunk_batch, chunk_context, used, ahead,
                   replica.num_blocks - used - replica.watermark_blocks, len(tokens),
                   len(replica.waiting), replica.max_batch_size, replica.block_size, ahead_time,
                   float(v0))
        return scalars, remaining, tokens


def running_requests(replica) -> list[tuple[bool, int, int, int, int]]:
    """The replica's running requests in admission order as ``(decoding, decode offset,
    generated, prompt, output)`` tuples: fixed while ``replica.running_version`` is."""
    return [(r.state is _DECODING, r.decode_offset, r.generated, r.prompt_tokens,
             r.output_tokens) for r in replica.running.values()]


#: The per-replica numbers of :meth:`EngineModel.replica_terms`, in order.
TERM_FIELDS = ("batch", "context", "t_dec", "cap", "chunk_batch", "chunk_context", "used",
               "ahead", "free_blocks", "num_running", "queued", "max_batch", "block_size",
               "ahead_time", "vllm_v0")
(_B, _CTX, _TDEC, _CAP, _CB, _CC, _USED, _AHEAD, _FREE, _NRUN, _QUEUED, _MAXB, _BS, _AHEADT,
 _V0) = range(len(TERM_FIELDS))


class ArrayIterationTime:
    """:meth:`~llm_cluster_env.sim.latency.IterationTimeModel.iteration_time` of one model for
    arrays of batches, bit for bit: the same table entries combined by the same floating-point
    operations in the same order. Entries outside the dense tables (batches or token counts
    above ``DENSE_TABLE_SIZE``, chunks above the longest profiled one, Vidur's rounded decode
    context) are computed one at a time by the model itself.

    :param latency: the iteration-time model (read-only).
    """

    def __init__(self, latency) -> None:
        self.latency = latency
        self.exact = latency.decode_context_granularity is None
        self._breaks = np.asarray(latency._context_breaks, dtype=np.float64)
        self._base = np.asarray(latency._segment_base, dtype=np.float64)
        self._beta = np.asarray(latency._segment_beta, dtype=np.float64)
        self._attention = np.asarray(latency._segment_attention, dtype=np.float64)
        self._dense = self._base.shape[1] - 1
        self._tokens = np.asarray(latency._tokens.dense, dtype=np.float64)
        self._lm_head = np.asarray(latency._lm_head.dense, dtype=np.float64)

    def decode(self, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Seconds of pure-decode iterations of ``batch`` (>= 1) requests with ``context``
        tokens in total (int64 arrays of one shape)."""
        out = np.empty(batch.shape)
        fast = batch <= self._dense if self.exact else np.zeros(batch.shape, dtype=bool)
        b, c = batch[fast], context[fast]
        s = np.searchsorted(self._breaks, c / b, side="right")
        out[fast] = self._base[s, b] + self._beta[s, b] * c
        for i in np.flatnonzero(~fast).tolist():
            out[i] = self.latency.iteration_time(int(batch[i]), int(context[i]))
        return out

    def prefill(self, batch: np.ndarray, context: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Seconds of iterations of ``batch`` decodes (``context`` tokens) plus one prompt chunk
        of ``chunk`` tokens with no prior context (int64 arrays of one shape)."""
        lat = self.latency
        n = batch + chunk
        rows = batch + 1
        fast = (n <= self._dense) & (chunk <= lat._max_chunk) & (rows <= self._dense)
        if not self.exact:
            fast &= batch == 0
        out = np.empty(batch.shape)
        b, c, x = batch[fast], context[fast], chunk[fast]
        time = (lat._overhead + lat._overhead_per_request * (b + 1) + self._tokens[b + x]
                + self._lm_head[b + 1] + lat._prefill0
                + x * (lat._prefill_token + lat._prefill_causal * x))
        decoding = b > 0
        if decoding.any():
            bd, cd = b[decoding], c[decoding]
            s = np.searchsorted(self._breaks, cd / bd, side="right")
            time[decoding] += self._attention[s, bd] + self._beta[s, bd] * cd
        out[fast] = time
        for i in np.flatnonzero(~fast).tolist():
            out[i] = lat.iteration_time(int(batch[i]), int(context[i]), ((int(chunk[i]), 0),))
        return out


class EngineArrays:
    """:meth:`EngineModel.estimate` for all replicas at once, with numpy.

    The caller keeps each replica's request-independent terms up to date
    (:meth:`update`, after the replica changed or its iteration clock moved: the rest keep
    theirs); :meth:`estimate` then evaluates the formulas for every replica in a few array
    operations. Values equal :meth:`EngineModel.estimate`'s (the same operations in the same
    order; the running requests' context sums are accumulated in admission order as there).

    :param model: the engine model (prior, oracle flag).
    :param replicas: the replicas (read-only; their iteration-time models are grouped).
    """

    def __init__(self, model: EngineModel, replicas: Sequence) -> None:
        self.model = model
        n = len(replicas)
        self.num_replicas = n
        self.terms = np.zeros((len(TERM_FIELDS), n))
        self.ints = np.zeros((len(TERM_FIELDS), n), dtype=np.int64)
        self._scalars: list[tuple] = [()] * n
        self._changed: list[int] = []  # replicas updated since the arrays were written
        empty = np.zeros(0)
        self._remaining: list[np.ndarray] = [empty] * n
        self._tokens: list[np.ndarray] = [empty] * n
        self._requests: list[tuple[int, tuple] | None] = [None] * n
        self._counts = np.zeros(n, dtype=np.int64)
        self._sorted: list[np.ndarray | None] = [None] * n
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        timings: dict[int, tuple[ArrayIterationTime, list[int]]] = {}
        for i, rep in enumerate(replicas):
            timings.setdefault(id(rep.latency), (ArrayIterationTime(rep.latency), []))[1].append(i)
        self._timings = [(t, slice(None) if len(idx) == n else np.asarray(idx))
                         for t, idx in timings.values()]

    def update(self, i: int, replica, clock: int) -> None:
        """Recompute replica ``i``'s terms at iteration clock ``clock``."""
        cached = self._requests[i]
        if cached is None or cached[0] != replica.running_version:
            cached = self._requests[i] = (replica.running_version, running_requests(replica))
        scalars, remaining, tokens = self.model.replica_terms(replica, clock, cached[1])
        self._scalars[i] = scalars
        self._changed.append(i)
        self._remaining[i] = remaining
        self._tokens[i] = tokens
        self._counts[i] = len(remaining)
        self._sorted[i] = None
        self._flat = None

    def _decode(self, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
        if len(self._timings) == 1:
            return self._timings[0][0].decode(batch, context)
        out = np.empty(batch.shape)
        for timing, idx in self._timings:
            out[idx] = timing.decode(batch[idx], context[idx])
        return out

    def _prefill(self, batch: np.ndarray, context: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        if len(self._timings) == 1:
            return self._timings[0][0].prefill(batch, context, chunk)
        out = np.empty(batch.shape)
        for timing, idx in self._timings:
            out[idx] = timing.prefill(batch[idx], context[idx], chunk[idx])
        return out

    def _running(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The running requests of every replica, replica by replica in admission order:
        (replica index, remaining decode tokens, prompt + generated tokens)."""
        if self._flat is None:
            owner = np.repeat(np.arange(self.num_replicas), self._counts)
            self._flat = (owner, np.concatenate(self._remaining),
                          np.concatenate(self._tokens))
        return self._flat

    def estimate(self, tau0: np.ndarray, prompt_tokens: int, output_tokens: int = 0,
                 cached_tokens: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(est_wait_s, est_ttft_s, est_delta_s)`` arrays of a pending request on every
        replica, ``tau0`` being each one's seconds to its next iteration boundary
        (:func:`clock_and_boundary`) and ``cached_tokens`` its cached prompt tokens there."""
        model = self.model
        prior = model.prior
        terms, ints = self.terms, self.ints
        if self._changed:  # the updated replicas' terms, in one call each
            changed = sorted(set(self._changed))
            self._changed = []
            values = np.array([self._scalars[i] for i in changed], dtype=np.float64).T
            terms[:, changed] = values
            ints[:, changed] = values
            ints[_TDEC], ints[_AHEADT], ints[_V0] = 0, 0, 0
        as_int = np.int64
        batch, t_dec, cap, used, ahead = ints[_B], terms[_TDEC], ints[_CAP], ints[_USED], ints[_AHEAD]
        num_running, queued, max_batch = ints[_NRUN], ints[_QUEUED], ints[_MAXB]
        expected_out = float(output_tokens) if model.oracle else prior.expected_output(prompt_tokens)
        horizon = expected_out - 1.0 if expected_out > 1.0 else 0.0
        steady = prior.mean_context

        # admission
        need = -(-(ahead + prompt_tokens) // ints[_BS])
        free = ints[_FREE]
        completions = (num_running + queued + 1 - max_batch).astype(np.float64)
        short = (need > free) & (num_running > 0)
        if short.any():
            per_request = np.where(used > num_running, used / np.maximum(num_running, 1), 1.0)
            completions = np.where(short, np.maximum(completions,
                                                     np.ceil((need - free) / per_request)),
                                   completions)
        admit_wait = np.zeros(self.num_replicas)
        for i in np.flatnonzero((completions > 0) & (t_dec > 0.0)).tolist():
            ordered = self._sorted[i]
            if ordered is None:
                ordered = self._sorted[i] = np.sort(self._remaining[i])
            k, n_run = int(completions[i]), len(ordered)
            if k <= n_run:
                admit_wait[i] = float(ordered[k - 1]) * float(t_dec[i])
            else:
                admit_wait[i] = (float(ordered[-1]) + (k - n_run) * prior.mean_output
                                 / (int(batch[i]) or 1)) * float(t_dec[i])
        ahead_time = terms[_AHEADT]
        wait = tau0 + np.maximum(ahead_time, admit_wait)
        if cached_tokens is None:
            own = np.full(self.num_replicas, max(prompt_tokens, 1), dtype=as_int)
        else:
            own = np.where(prompt_tokens > cached_tokens, prompt_tokens - cached_tokens, 1)
        prefill_iterations = np.ceil(own / cap)
        own_prefill = prefill_iterations * self._prefill(ints[_CB], ints[_CC], np.minimum(own, cap))
        ttft = wait + own_prefill

        co_batch = np.minimum(batch + queued, max_batch - 1)
        extra = own_prefill - prefill_iterations * t_dec
        delta = ttft + np.where(batch > 0, np.where(
            terms[_V0] > 0, batch * own_prefill, np.where(extra > 0.0, batch * extra, 0.0)), 0.0)
        if horizon > 0.0:
            co_context = self._co_context(horizon, steady)
            if queued.any():
                fresh = np.where(ahead > 0, ahead / np.maximum(queued, 1), steady)
                mq = prior.mean_output if prior.mean_output < horizon else horizon
                co_context = np.where(queued > 0, co_context + queued * (
                    mq * fresh + 0.5 * mq * (mq - 1.0) + (horizon - mq) * steady), co_context)
            mean_co = co_context / horizon
            mean_own = prompt_tokens + 0.5 * (horizon - 1.0)
            with_us = self._decode(co_batch + 1, np.trunc(mean_co + mean_own + 0.5).astype(as_int))
            delta = delta + horizon * with_us
            corun = co_batch > 0
            if corun.any():
                without = self._decode(np.maximum(co_batch, 1),
                                       np.maximum(np.trunc(mean_co + 0.5).astype(as_int), 1))
                delta = np.where(corun, delta + co_batch * horizon * (with_us - without), delta)
        return wait, ttft, delta


    def _co_context(self, horizon: float, steady: float) -> np.ndarray:
        """Per replica, its running requests' context tokens summed over ``horizon`` decode
        iterations (accumulated in admission order, as :meth:`EngineModel.estimate` does)."""
        owner, remaining, tokens = self._running()
        m = np.minimum(remaining, horizon)
        return np.bincount(owner, m * tokens + 0.5 * m * (m - 1.0) + (horizon - m) * steady,
                           minlength=self.num_replicas)


class ScalarIterationTime:
    """:meth:`~llm_cluster_env.sim.latency.IterationTimeModel.iteration_time` of one model for
    the shapes :class:`EngineScalars` asks, bit for bit: pure-decode iterations through the
    model's own dense-table lookup (the model itself outside the dense tables), and
    iterations of one prompt chunk with no prior context beside ``b`` decodes summed as the
    model sums them: the part that depends only on ``(b, chunk)`` (memoised per ``b``,
    :meth:`chunks`), plus the decodes' attention.

    :param latency: the iteration-time model (read-only).
    """

    def __init__(self, latency) -> None:
        from llm_cluster_env.sim.latency import DENSE_TABLE_SIZE

        self.latency = latency
        #: Decode lookups in the dense tables up to this batch (0: none, Vidur's rounding).
        self.dense = DENSE_TABLE_SIZE if latency.decode_context_granularity is None else 0
        self.breaks = latency._context_breaks
        self.base = latency._segment_base
        self.beta = latency._segment_beta
        self._attention = latency._segment_attention
        self._chunks: dict[int, dict[int, float]] = {}

    def decode(self, batch: int, context: int) -> float:
        """``iteration_time(batch, context)`` (``batch`` >= 1)."""
        if batch <= self.dense:
            s = bisect_right(self.breaks, context / batch)
            return self.base[s][batch] + self.beta[s][batch] * context
        return self.latency.iteration_time(batch, context)

    def decode_and_attention(self, batch: int, context: int) -> tuple[float, float]:
        """``iteration_time(batch, context)`` and ``decode_attention_time(batch, context)``
        (``batch`` >= 1)."""
        if batch <= self.dense:
            s = bisect_right(self.breaks, context / batch)
            slope = self.beta[s][batch] * context
            return self.base[s][batch] + slope, self._attention[s][batch] + slope
        lat = self.latency
        return lat.iteration_time(batch, context), lat.decode_attention_time(batch, context)

    def chunks(self, batch: int) -> dict[int, float]:
        """The memo ``chunk -> time`` of :meth:`chunk_base` for ``batch`` decodes."""
        memo = self._chunks.get(batch)
        if memo is None:
            if len(self._chunks) >= _CHUNK_MEMO_BATCHES:
                self._chunks.clear()
            memo = self._chunks[batch] = {}
        return memo

    def chunk_base(self, decode_batch: int, chunk: int) -> float:
        """``iteration_time(decode_batch, context, ((chunk, 0),))`` without the decodes'
        attention (which the model adds last, when ``decode_batch`` > 0), memoised."""
        memo = self.chunks(decode_batch)
        if len(memo) >= _CHUNK_MEMO_SIZE:
            memo.clear()
        lat = self.latency
        if decode_batch == 0:
            time = memo[chunk] = lat.iteration_time(0, 0, ((chunk, 0),))
            return time
        # the model's own sum for one chunk with no prior context (latency.iteration_time)
        context = 0
        per_chunk = 0.0
        if chunk <= lat._max_chunk:
            per_chunk += chunk * (lat._prefill_token + lat._prefill_pair * context
                                  + lat._prefill_causal * chunk) + lat._prefill_prior * context
        else:
            per_chunk += lat._prefill_chunk_time(chunk, context)
        rows = decode_batch + 1
        time = memo[chunk] = (lat._overhead + lat._overhead_per_request * rows
                              + lat._tokens(decode_batch + chunk) + lat._lm_head(rows)
                              + lat._prefill0 + per_chunk)
        return time


class EngineScalars:
    """:meth:`EngineModel.estimate` for a few replicas, replica by replica in plain Python
    (array calls cost more than they save on a few tens of values), with each replica's
    request-independent terms kept between decisions.

    The caller calls :meth:`update` after a replica changed or its iteration clock moved (the
    others keep their terms); :meth:`estimate` then evaluates the formulas for every replica.
    Values equal :meth:`EngineModel.estimate`'s bit for bit: the same operations in the same
    order, the running requests' context sums accumulated in admission order. What it saves:
    the iteration times and admission terms that depend only on the replica's state are
    computed once per state, the others without the model's generic call (a chunk
    iteration's request-independent part memoised); the running requests are walked once per
    estimate, without building lists (their sorted remaining lengths only when admission
    needs them), and a running request that will outlive the pending request's horizon adds
    its context sum in a precomputed form (the terms that are exactly zero then dropped).

    :param model: the engine model (prior, oracle flag).
    :param replicas: the replicas (read-only).
    """

    def __init__(self, model: EngineModel, replicas: Sequence) -> None:
        self.model = model
        self.replicas = list(replicas)
        timings: dict[int, ScalarIterationTime] = {}
        self._timing = [timings.setdefault(id(r.latency), ScalarIterationTime(r.latency))
                        for r in self.replicas]
        #: Per replica, what :meth:`update` read (in the order :meth:`estimate` unpacks it;
        #: :data:`_T_SORTED` filled on demand); ``None``: not yet.
        self._terms: list[list | None] = [None] * len(self.replicas)

    def update(self, i: int, replica, clock: int) -> None:
        """Recompute replica ``i``'s terms at iteration clock ``clock``."""
        timing = self._timing[i]
        batch = replica.num_decoding
        v0 = replica.batching == "vllm_v0"
        if batch:
            context = batch * clock - replica._sum_r
            t_dec, attention = timing.decode_and_attention(batch, context)
        else:
            context = 0
            t_dec = attention = 0.0
        budget = replica.token_budget
        cap = budget if (v0 or not replica.chunked_prefill) else max(budget - batch, 1)
        chunk_batch = 0 if v0 else batch
        used = replica.decode_blocks(clock) + replica.prefill_blocks
        ahead = replica.pending_prefill_tokens
        chunks = timing.chunks(chunk_batch)
        if ahead > 0:
            x = ahead if ahead < cap else cap
            time = chunks.get(x)
            if time is None:
                time = timing.chunk_base(chunk_batch, x)
            ahead_time = math.ceil(ahead / cap) * (time + attention if chunk_batch else time)
        else:
            ahead_time = 0.0
        # the running requests are read at estimates, as they are then (the caller updates
        # the replica's terms whenever it changes)
        self._terms[i] = [clock, batch, t_dec, cap, chunk_batch, attention, used, ahead,
                          replica.num_blocks - used - replica.watermark_blocks,
                          len(replica.running), len(replica.waiting), replica.max_batch_size,
                          replica.block_size, ahead_time, v0, replica.running, timing, chunks,
                          None, {}]

    def _remaining(self, terms: list) -> list:
        """The replica's running requests' expected (or true) remaining decode tokens, sorted."""
        ordered = terms[_T_SORTED]
        if ordered is None:
            clock = terms[0]
            decoding = _DECODING
            if self.model.oracle:
                ordered = [r.output_tokens - (clock - r.decode_offset if r.state is decoding
                                              else r.generated) for r in terms[15].values()]
            else:
                table = self.model.prior._residual
                size = len(table)
                last = table[-1]
                ordered = []
                for r in terms[15].values():
                    g = clock - r.decode_offset if r.state is decoding else r.generated
                    ordered.append(table[g] if g < size else last)
            ordered.sort()
            terms[_T_SORTED] = ordered
        return ordered

    def estimate(self, tau0: Sequence[float], prompt_tokens: int, output_tokens: int = 0,
                 cached_tokens: Sequence[int] | None = None) -> list[tuple[float, float, float]]:
        """``(est_wait_s, est_ttft_s, est_delta_s)`` of a pending request on every replica,
        ``tau0`` being each one's seconds to its next iteration boundary
        (:func:`clock_and_boundary`) and ``cached_tokens`` its cached prompt tokens there."""
        model = self.model
        prior = model.prior
        oracle = model.oracle
        expected_out = float(output_tokens) if oracle else prior.expected_output(prompt_tokens)
        horizon = expected_out - 1.0 if expected_out > 1.0 else 0.0
        steady = prior.mean_context
        mean_output = prior.mean_output
        # a running request with m = its remaining tokens >= horizon adds
        # horizon * (p + g) + full + (horizon - horizon) * steady, the last term exactly 0
        full = 0.5 * horizon * (horizon - 1.0)
        mean_own = prompt_tokens + 0.5 * (horizon - 1.0)
        m_queued = mean_output if mean_output < horizon else horizon
        table = prior._residual
        size = len(table)
        end = table[-1]
        decoding = _DECODING
        ceil = math.ceil
        out = []
        append = out.append
        for i, terms in enumerate(self._terms):
            (clock, batch, t_dec, cap, chunk_batch, attention, used, ahead, free_blocks,
             num_running, queued, max_batch, block_size, ahead_time, v0, running, timing,
             chunks, _, by_horizon) = terms
            # admission: a batch slot and KV blocks above the watermark for everything ahead + us
            need_blocks = -(-(ahead + prompt_tokens) // block_size)
            completions = num_running + queued + 1 - max_batch
            if need_blocks > free_blocks and num_running:
                per_request = used / num_running if used > num_running else 1.0
                completions = max(completions, ceil((need_blocks - free_blocks) / per_request))
            admit_wait = 0.0
            if completions > 0 and t_dec > 0.0:
                remaining = self._remaining(terms)
                if completions <= num_running:
                    admit_wait = remaining[completions - 1] * t_dec
                else:
                    admit_wait = (remaining[-1] + (completions - num_running) * mean_output
                                  / (batch or 1)) * t_dec
            wait = tau0[i] + (ahead_time if ahead_time > admit_wait else admit_wait)
            cached = cached_tokens[i] if cached_tokens is not None else 0
            own = prompt_tokens - cached if prompt_tokens > cached else 1
            prefill_iterations = ceil(own / cap)
            x = own if own < cap else cap
            time = chunks.get(x)
            if time is None:
                time = timing.chunk_base(chunk_batch, x)
            own_prefill = prefill_iterations * (time + attention if chunk_batch else time)
            ttft = wait + own_prefill
            co_batch = batch + queued
            if co_batch >= max_batch:
                co_batch = max_batch - 1
            delta = ttft
            if batch:
                if v0:
                    delta += batch * own_prefill
                else:
                    extra = own_prefill - prefill_iterations * t_dec
                    delta += batch * extra if extra > 0.0 else 0.0
            if horizon > 0.0:
                # the running requests' context tokens over our horizon, in admission order
                co_context = by_horizon.get(horizon)
                if co_context is None:
                    co_context = 0.0
                    if oracle:
                        for r in running.values():
                            g = clock - r.decode_offset if r.state is decoding else r.generated
                            left = r.output_tokens - g
                            if left < horizon:
                                co_context += (left * (r.prompt_tokens + g)
                                               + 0.5 * left * (left - 1.0)
                                               + (horizon - left) * steady)
                            else:
                                co_context += horizon * (r.prompt_tokens + g) + full
                    else:
                        for r in running.values():
                            g = clock - r.decode_offset if r.state is decoding else r.generated
                            left = table[g] if g < size else end
                            if left < horizon:
                                co_context += (left * (r.prompt_tokens + g)
                                               + 0.5 * left * (left - 1.0)
                                               + (horizon - left) * steady)
                            else:
                                co_context += horizon * (r.prompt_tokens + g) + full
                    by_horizon[horizon] = co_context
                if queued:
                    fresh = ahead / queued if ahead > 0 else steady
                    co_context += queued * (m_queued * fresh + 0.5 * m_queued * (m_queued - 1.0)
                                            + (horizon - m_queued) * steady)
                mean_co = co_context / horizon
                n, c = co_batch + 1, int(mean_co + mean_own + 0.5)
                if n <= timing.dense:
                    s = bisect_right(timing.breaks, c / n)
                    with_us = timing.base[s][n] + timing.beta[s][n] * c
                else:
                    with_us = timing.decode(n, c)
                delta += horizon * with_us
                if co_batch:
                    n, c = co_batch, max(int(mean_co + 0.5), 1)
                    if n <= timing.dense:
                        s = bisect_right(timing.breaks, c / n)
                        without_us = timing.base[s][n] + timing.beta[s][n] * c
                    else:
                        without_us = timing.decode(n, c)
                    delta += co_batch * horizon * (with_us - without_us)
            append((wait, ttft, delta))
        return out


#: :class:`EngineScalars` terms: the sorted remaining lengths (``None`` until admission needs
#: them), and the running requests' context sum by horizon (of the estimates so far).
_T_SORTED = 18
#: :class:`ScalarIterationTime` memo bounds: decode batches, and chunk sizes per batch.
_CHUNK_MEMO_BATCHES = 256
_CHUNK_MEMO_SIZE = 4096


def clock_end_until(replica, now: float) -> tuple[int, float, float]:
    """The replica's iteration clock at ``now``, the end of the iteration in flight (seconds;
    ``-inf`` when none is, so the time to the next boundary is ``max(end - now, 0)``), and the
    time until which both hold while the replica's state does not change (what
    :func:`clock_and_boundary` and the observation builder read)."""
    if not replica.busy:
        return replica.clock, -math.inf, math.inf
    if replica._batch_pure and replica.batch_iterations > 1:
        done = replica.iterations_done_by(now)
        if done < replica.batch_iterations:
            end = replica.batch_start + replica._stretch_duration(done + 1)
            return replica.clock + done, end, end
        return replica.clock + done, -math.inf, math.inf
    return replica.clock, replica.batch_end, math.inf


def clock_and_boundary(replica, now: float) -> tuple[int, float]:
    """The replica's iteration clock at ``now`` and the seconds from ``now`` to the end of the
    iteration in flight (0 when idle): the next point at which it can schedule a request."""
    clock, end, _ = clock_end_until(replica, now)
    return clock, (end - now if end > now else 0.0)


__all__ = ["ENGINE_FEATURES", "TERM_FIELDS", "ArrayIterationTime", "EngineArrays", "EngineModel",
           "EngineScalars", "OutputLengthPrior", "ScalarIterationTime", "clock_and_boundary",
           "clock_end_until", "running_requests"]
