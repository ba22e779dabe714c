"""Request workloads (this package): arrival processes, request lengths, trace replay and trace validation.

A :class:`WorkloadGenerator` turns a :class:`~llm_cluster_env.config.WorkloadConfig` into
episodes (:class:`Workload`): arrival times (seconds from episode start), prompt and output
lengths (tokens). Everything random comes from the ``np.random.Generator`` passed to
:meth:`WorkloadGenerator.sample`, so equal-state generators give identical episodes.

Arrival processes (``WorkloadConfig.arrival``)
----------------------------------------------
``poisson``
    Exponential gaps with mean ``1/qps`` seconds.
``gamma``
    Gamma gaps with mean ``1/qps`` and coefficient of variation ``cv``: shape ``1/cv**2``,
    scale ``cv**2/qps`` seconds (``cv = 1`` is Poisson; ``cv > 1`` is bursty).
``phases``
    The ``phases`` list repeated cyclically. Inside a phase the gaps are gamma with that phase's
    ``qps`` and the global ``cv``. A gap that would cross a phase boundary is discarded and the
    draw restarts *at the boundary* with the next phase's rate, i.e. each phase runs a fresh
    (ordinary) renewal process from its start. For Poisson gaps (``cv = 1``) this is exact by
    memorylessness. For other ``cv`` the expected count in a phase is
    ``qps * duration_s + (cv**2 - 1) / 2 + o(1)`` (renewal theory: a fresh gamma renewal
    process is denser at its start than a stationary one when ``cv > 1``, sparser when
    ``cv < 1``), so phases should hold many arrivals (``qps * duration_s >> cv**2``) for their
    rate to be ``qps``.
``trace``
    Arrival times replayed from ``trace_path``: rows ``[start, start + N)`` where ``start`` is
    ``trace_start`` or drawn uniformly from all rows by the episode's generator, times shifted so
    the first request arrives at 0. The trace is treated as periodic: a window running past the
    last row wraps to row 0, one *period* later, where ``period = span + mean_gap``
    (``span`` = last minus first arrival, ``mean_gap = span / (rows - 1)``). This keeps arrival
    times strictly increasing across the seam and makes the repeated trace's mean rate exactly
    the trace's own ``(rows - 1) / span``. ``trace_qps`` rescales the whole time axis by
    ``(trace's mean rate) / trace_qps``, so the (repeated) trace runs at exactly ``trace_qps``
    on average while each window keeps the trace's own load variations (a window's own rate is
    close to, not exactly, ``trace_qps``).

Synthetic processes start their first gap at ``t = 0``, so their first arrival is at
``t > 0``; replayed traces start at exactly ``t = 0``.

Request lengths (``WorkloadConfig.lengths``)
--------------------------------------------
``fixed``: ``prompt_tokens`` / ``output_tokens``. ``uniform``: integers from the inclusive
``*_tokens_range``. ``lognormal``: independent log-normal prompt and output lengths,
``(median, sigma)`` each (``*_lognormal``), rounded, at least 1 token. ``trace``: rows of ``trace_path`` (in order when replaying arrivals, drawn
with replacement otherwise). ``empirical``: joint draws from a packaged length summary
``llm_cluster_env/data/<empirical>.json`` (see :func:`available_empirical`).

Packaged length summaries (format ``llm_cluster_env/length-summary/v1``)
-------------------------------------------------------------------------
A summary is an *empirical checkerboard copula* over per-column quantile tables:

* ``quantile_levels`` and ``{prompt,output}_tokens_quantiles``: each marginal's quantile
  function (``numpy.quantile(..., method="inverted_cdf")``) at ~1,050 levels, denser in the
  tails (0.05 % steps below the 1st percentile, 0.02 % above the 99th);
* ``copula``: the joint distribution of the two columns' *ranks* as counts on a grid of
  rank cells (``prompt_rank_edges`` x ``output_rank_edges``, 35 x 35, finer in the tails).
  Ties are broken at random (fixed seed) so every rank row and column of the grid holds
  exactly its share of requests.

A draw picks a cell with probability ``count / total``, a point uniformly inside the cell
(``u``, ``v`` in rank space), and maps each coordinate through its quantile function (linear
interpolation between table entries, rounded to whole tokens). Because the cell grid has
exact uniform marginals, each length's marginal distribution is the quantile table's up to
interpolation (measured quantiles p50/p90/p99/p99.9 within 1 % of the source); the dependence
between prompt and output is the data's own at grid resolution, including its non-linear
shape: e.g. for ``splitwise_conv`` the mean output per prompt-length decile ranges 74..412
tokens non-monotonically, and for ``arxiv_summarization`` very long outputs only come with
short prompts (the source was filtered to ``prompt + output <= 4096``; samples exceed that
in ~0.5 % of draws, by a few hundred tokens, because of the within-cell uniform spread).
Alternatives considered: a log-spaced 2-D histogram sampled log-uniformly within bins blurs
the marginals (point masses such as the 2 % of conversation prompts of exactly 181 tokens, and
quantiles only to bin resolution); a Gaussian copula reduces the dependence to one
correlation and cannot express either of the shapes above.

Prompts that share prefixes
---------------------------
A Mooncake JSONL trace (``trace_path`` ending in ``.jsonl``) and the synthetic ``prefix``
generators (``multiturn`` sessions, shared ``system_prompt``) give every request its prompt's
block identities (``Workload.chains``), for replicas with prefix caching; they live in
:mod:`llm_cluster_env.workload.prefix`. The oversize policy cuts a clipped prompt's chain too.

Oversized requests (``WorkloadConfig.oversize_policy``, cap ``max_total_tokens``)
----------------------------------------------------------------------------------
``clip``: the excess ``prompt + output - cap`` is removed from both lengths in proportion to
their size (each cut rounded up, each length kept ``>= 1``), as Vidur does, so
``prompt + output <= cap`` (counted in ``Workload.num_clipped``).
``reject``: the request is dropped (arrays get shorter; counted in ``num_rejected``).
``error``: :meth:`WorkloadGenerator.sample` raises ``ValueError`` naming the request index,
its trace line (for trace lengths) and its lengths.
"""

from __future__ import annotations

from llm_cluster_env.workload.arrivals import gamma_arrivals, phase_arrivals, poisson_arrivals
from llm_cluster_env.workload.generator import WorkloadGenerator
from llm_cluster_env.workload.lengths import (
    DATA_DIR,
    SUMMARY_FORMAT,
    EmpiricalLengths,
    available_empirical,
    clip_lengths,
    load_empirical,
    lognormal_tokens,
)
from llm_cluster_env.workload.requests import Trace, TraceError, Workload
from llm_cluster_env.workload.traces import TRACE_COLUMNS, load_trace, trace_window

__all__ = [
    "DATA_DIR",
    "SUMMARY_FORMAT",
    "TRACE_COLUMNS",
    "EmpiricalLengths",
    "Trace",
    "TraceError",
    "Workload",
    "WorkloadGenerator",
    "available_empirical",
    "clip_lengths",
    "gamma_arrivals",
    "load_empirical",
    "load_trace",
    "lognormal_tokens",
    "phase_arrivals",
    "poisson_arrivals",
    "trace_window",
]
