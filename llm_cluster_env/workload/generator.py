"""The workload generator: a :class:`~llm_cluster_env.config.WorkloadConfig` into episodes (see the package docs)."""

from __future__ import annotations

import dataclasses

import numpy as np

from llm_cluster_env.config import WorkloadConfig
from llm_cluster_env.validation import ConfigError
from llm_cluster_env.workload import prefix as prefix_workload
from llm_cluster_env.workload.arrivals import gamma_arrivals, phase_arrivals, poisson_arrivals
from llm_cluster_env.workload.lengths import (
    EmpiricalLengths,
    clip_lengths,
    load_empirical,
    lognormal_tokens,
    oversize_message,
)
from llm_cluster_env.workload.requests import Trace, Workload
from llm_cluster_env.workload.traces import load_trace, trace_window

_MEAN_ESTIMATE_DRAWS = 1 << 16  # Monte Carlo draws for the mean lengths of random lengths
_MEAN_ESTIMATE_SEED = 20240601  # private seed: the estimate is a property of the config
_PREFIX_MEAN_REQUESTS = 1 << 13  # requests of the episode that measures prefix workloads' means

class WorkloadGenerator:
    """Draws episodes from a :class:`WorkloadConfig`.

    :param config: the workload configuration.
    :param max_total_tokens: cap on prompt + output tokens per request (tokens, >= 2), resolved
        by the caller (``config.max_total_tokens`` or the replicas' limits).
    :param shared_cache: a dict of read-only objects shared between generators built often
        (packaged length summaries and length samples), or ``None``.
    :raises ConfigError: (a ``ValueError``) for invalid settings, an unknown empirical summary,
        ``trace_start`` past the trace's end, a replayed trace without a time span, or a
        ``"reject"`` policy that would drop every request.
    :raises TraceError: when the trace file is missing or malformed.
    """

    def __init__(self, config: WorkloadConfig, max_total_tokens: int,
                 shared_cache: dict | None = None):
        if isinstance(max_total_tokens, bool) or not isinstance(max_total_tokens, (int, np.integer)) \
                or max_total_tokens < 2:
            raise ConfigError(f"max_total_tokens={max_total_tokens!r}: must be an integer >= 2 "
                              "tokens (room for one prompt and one output token)")
        self.config = config
        self.max_total_tokens = int(max_total_tokens)
        self._trace = self._load_trace() if "trace" in (config.arrival, config.lengths) else None
        self._empirical = None
        if config.lengths == "empirical":
            empirical_key = ("empirical", config.empirical)
            self._empirical = shared_cache.get(empirical_key) if shared_cache is not None else None
            if self._empirical is None:
                self._empirical = load_empirical(config.empirical)
                if shared_cache is not None:
                    shared_cache[empirical_key] = self._empirical
        #: What determines :meth:`length_sample` (a key for caches shared between envs).
        #: (Every length setting; the arrival process does not change lengths.)
        self.length_key = key = (
            "length_sample", self.max_total_tokens,
            dataclasses.replace(config, arrival="poisson", qps=1.0, cv=1.0, phases=(),
                                trace_qps=None, trace_start=None, trace_rows=None))
        cached = shared_cache.get(key) if shared_cache is not None else None
        if cached is None:
            cached = self._entering_lengths()
            if shared_cache is not None:
                shared_cache[key] = cached
        self._length_sample = cached
        self._mean_prompt = float(self._length_sample[0].mean())
        self._mean_output = float(self._length_sample[1].mean())

    # ---- set-up -----------------------------------------------------------------------------

    def _load_trace(self) -> Trace:
        """Load the trace and check it can serve ``config.arrival``."""
        config = self.config
        if config.trace_path is None:
            raise ConfigError(f"workload.trace_path=None: arrival={config.arrival!r}, "
                              f"lengths={config.lengths!r} needs a trace CSV path")
        trace = load_trace(config.trace_path, config.trace_format, config.trace_hash_block_tokens)
        if config.arrival != "trace":
            return trace
        if not trace.span_s > 0:
            raise ConfigError(
                f"workload.trace_path={config.trace_path!r}: arrival='trace' needs at least two "
                f"distinct arrival times to define a rate (found {len(trace)} rows spanning "
                f"{trace.span_s} s)"
            )
        if config.trace_rows is not None and config.trace_rows[0] >= len(trace):
            raise ConfigError(f"workload.trace_rows={config.trace_rows!r}: starts past the last "
                              f"row of {config.trace_path} ({len(trace)} rows)")
        if config.trace_start is not None and config.trace_start >= len(trace):
            raise ConfigError(f"workload.trace_start={config.trace_start!r}: past the last row of "
                              f"{config.trace_path} ({len(trace)} rows; valid 0..{len(trace) - 1})")
        return trace

    def length_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, output) lengths (tokens) representing the requests that enter the cluster,
        after the oversize policy: exact for fixed and trace lengths, an episode of
        ``_PREFIX_MEAN_REQUESTS`` requests for prefix workloads (prompts grow with history),
        else 2**16 draws, all from a private fixed seed. The prior of routers' output-length
        estimates (read-only)."""
        return self._length_sample

    def _entering_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        if self.config.prefix != "none":  # prompts grow with history: measure an episode
            rng = np.random.default_rng(_MEAN_ESTIMATE_SEED)
            _, prompt, output, _, _ = self._sample_raw(_PREFIX_MEAN_REQUESTS, rng)
        else:
            prompt, output = self._length_population()
        policy = self.config.oversize_policy
        if policy == "clip":
            prompt, output = clip_lengths(prompt, output, self.max_total_tokens)
        elif policy == "reject":
            fits = prompt + output <= self.max_total_tokens
            if not fits.any():
                raise ConfigError(
                    f"workload.oversize_policy='reject': every request exceeds "
                    f"max_total_tokens={self.max_total_tokens} with lengths="
                    f"{self.config.lengths!r}, so every episode would be empty"
                )
            prompt, output = prompt[fits], output[fits]
        prompt, output = np.array(prompt), np.array(output)
        prompt.flags.writeable = output.flags.writeable = False
        return prompt, output

    def _length_population(self) -> tuple[np.ndarray, np.ndarray]:
        """Lengths whose mean is the distribution's: exact for fixed/trace, else 2**16 draws."""
        config = self.config
        if config.lengths == "fixed":
            return np.array([config.prompt_tokens]), np.array([config.output_tokens])
        if config.lengths == "trace":
            assert self._trace is not None
            return self._trace.prompt_tokens, self._trace.output_tokens
        prompt, output, _ = self._sample_lengths(_MEAN_ESTIMATE_DRAWS,
                                                 np.random.default_rng(_MEAN_ESTIMATE_SEED))
        return prompt, output

    # ---- public API -------------------------------------------------------------------------

    @property
    def mean_output_tokens(self) -> float:
        """Expected output length (tokens) of a request entering the cluster, after clipping.

        With ``reject`` it is the mean over the requests that fit; with ``error`` the raw mean.
        Exact for fixed and trace lengths; uniform and empirical lengths use 2**16 draws from a
        private fixed seed (standard error well under 1 %).
        """
        return self._mean_output

    @property
    def mean_prompt_tokens(self) -> float:
        """Expected prompt length (tokens) of a request entering the cluster (as above)."""
        return self._mean_prompt

    @property
    def trace(self) -> Trace | None:
        """The validated trace, when the config uses one."""
        return self._trace

    @property
    def empirical(self) -> EmpiricalLengths | None:
        """The empirical length sampler, when ``lengths="empirical"``."""
        return self._empirical

    def sample(self, num_requests: int, rng: np.random.Generator) -> Workload:
        """Draw one episode of ``num_requests`` requests using only ``rng``.

        Arrivals are drawn first, then lengths. The oversize policy is applied against
        ``max_total_tokens`` (see the module docstring).

        :raises ValueError: with ``oversize_policy="error"``, naming the first oversized
            request's index, its trace line (for trace lengths) and its lengths.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if isinstance(num_requests, bool) or not isinstance(num_requests, (int, np.integer)) \
                or num_requests < 0:
            raise ValueError(f"num_requests={num_requests!r}: must be an integer >= 0")
        n = int(num_requests)
        times, prompt, output, rows, chains = self._sample_raw(n, rng)
        return self.apply_oversize_policy(times, prompt, output, rows, chains)

    def _sample_raw(self, n: int, rng: np.random.Generator):
        """Arrival times, lengths, trace rows (or ``None``) and chains (or ``None``) of ``n``
        requests before the oversize policy."""

        config = self.config
        if config.prefix == "multiturn":
            times, prompt, output, chains = prefix_workload.multiturn_sessions(
                n, config.qps, config.multiturn, self._sample_joint_lengths,
                self.max_total_tokens, rng)
            return times, prompt, output, None, chains
        times, rows, cycles = self._sample_arrivals(n, rng)
        if rows is None:
            prompt, output, rows = self._sample_lengths(n, rng)
            cycles = None
        else:
            assert self._trace is not None
            prompt, output = self._trace.prompt_tokens[rows], self._trace.output_tokens[rows]
        chains = None
        if self._trace is not None and self._trace.segments is not None:
            chains = prefix_workload.trace_chains(self._trace, rows, cycles)
        elif config.prefix == "system_prompt":
            prompt, chains = prefix_workload.system_prompt_requests(prompt, config.system_prompt,
                                                                    rng)
        return times, prompt, output, rows, chains

    def _sample_joint_lengths(self, n: int, rng: np.random.Generator
                              ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt, output) lengths (tokens) of the ``lengths`` distribution."""
        prompt, output, _ = self._sample_lengths(n, rng)
        return prompt, output

    # ---- sampling steps ---------------------------------------------------------------------

    def _sample_arrivals(self, n: int, rng: np.random.Generator
                         ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Arrival times (seconds) and, when replaying a trace, the trace rows used and how
        often the window wrapped before each."""
        config = self.config
        if config.arrival == "poisson":
            return poisson_arrivals(n, config.qps, rng), None, None
        if config.arrival == "gamma":
            return gamma_arrivals(n, config.qps, config.cv, rng), None, None
        if config.arrival == "phases":
            return phase_arrivals(n, config.phases, config.cv, rng), None, None
        assert self._trace is not None
        start = config.trace_start
        if start is None and config.trace_rows is not None:
            first, end = config.trace_rows
            end = min(end, len(self._trace))
            if n > end - first:
                raise ValueError(f"workload.trace_rows={config.trace_rows}: {end - first} rows "
                                 f"of {config.trace_path} cannot hold an episode of {n} requests")
            start = first + int(rng.integers(end - first - n + 1))
        elif start is None:
            start = int(rng.integers(len(self._trace)))
        times, rows = trace_window(self._trace, n, start, config.trace_qps)
        return times, rows, (start + np.arange(n, dtype=np.int64)) // len(self._trace)

    def _sample_lengths(self, n: int, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``n`` independent (prompt, output) lengths (tokens), and the trace rows drawn if any."""
        config = self.config
        if config.lengths == "fixed":
            return (np.full(n, config.prompt_tokens, dtype=np.int64),
                    np.full(n, config.output_tokens, dtype=np.int64), None)
        if config.lengths == "uniform":
            (p_lo, p_hi), (o_lo, o_hi) = config.prompt_tokens_range, config.output_tokens_range
            return (rng.integers(p_lo, p_hi, size=n, endpoint=True, dtype=np.int64),
                    rng.integers(o_lo, o_hi, size=n, endpoint=True, dtype=np.int64), None)
        if config.lengths == "empirical":
            assert self._empirical is not None
            return (*self._empirical.sample(n, rng), None)
        if config.lengths == "lognormal":
            return (lognormal_tokens(n, *config.prompt_lognormal, rng),
                    lognormal_tokens(n, *config.output_lognormal, rng), None)
        assert self._trace is not None
        rows = rng.integers(len(self._trace), size=n)
        return self._trace.prompt_tokens[rows], self._trace.output_tokens[rows], rows

    def apply_oversize_policy(self, times: np.ndarray, prompt: np.ndarray, output: np.ndarray,
                              rows: np.ndarray | None = None,
                              chains: tuple | None = None) -> Workload:
        """Package given arrival times (seconds) and lengths (tokens) as a :class:`Workload`
        after ``oversize_policy`` against ``max_total_tokens``: clipped, rejected (dropped and
        counted) or ``ValueError`` naming the first oversized request (and its line in this
        generator's trace when ``rows`` maps requests to trace rows). Times are kept as given.
        ``chains`` (the requests' prefix chains) follow: a clipped prompt keeps the segments
        that start inside it, and what follows is unique to the request."""
        cap = self.max_total_tokens
        over = prompt + output > cap
        policy = self.config.oversize_policy
        if not over.any():
            return Workload(times, prompt, output, chains=chains)
        if policy == "clip":
            prompt, output = clip_lengths(prompt, output, cap)
            if chains is not None:
                chains = tuple(chain.truncated(int(prompt[i]), -(i + 1)) if over[i] else chain
                               for i, chain in enumerate(chains))
            return Workload(times, prompt, output, num_clipped=int(over.sum()), chains=chains)
        if policy == "reject":
            keep = ~over
            if chains is not None:
                chains = tuple(c for c, k in zip(chains, keep.tolist()) if k)
            return Workload(times[keep], prompt[keep], output[keep],
                            num_rejected=int(over.sum()), chains=chains)
        index = int(np.argmax(over))
        row = None if rows is None else int(rows[index])
        raise ValueError(oversize_message(index, int(prompt[index]), int(output[index]), cap,
                                           self._trace, row))
