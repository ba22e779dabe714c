"""Request workloads: arrival processes, request lengths, trace replay and trace validation.

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

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.config import PhaseConfig, WorkloadConfig
from llm_cluster_env.validation import ConfigError

#: Packaged length summaries live here as ``<name>.json``.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: ``format`` tag of a packaged length summary.
SUMMARY_FORMAT = "llm_cluster_env/length-summary/v1"
#: Columns a trace CSV must have (others are ignored).
TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")

_ARRIVAL_COLUMN, _PROMPT_COLUMN, _OUTPUT_COLUMN = TRACE_COLUMNS
_MAX_TOKENS = 2**53  # token counts must convert to int64 exactly
_MEAN_ESTIMATE_DRAWS = 1 << 16  # Monte Carlo draws for the mean lengths of random lengths
_MEAN_ESTIMATE_SEED = 20240601  # private seed: the estimate is a property of the config
_PREFIX_MEAN_REQUESTS = 1 << 13  # requests of the episode that measures prefix workloads' means
_MAX_DRAWS_PER_BLOCK = 1 << 21  # memory bound of one vectorised block of phase gaps
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------


class TraceError(ValueError):
    """A trace file is missing or malformed.

    The message names the file, the 1-based line number (the header is line 1), the column and
    the offending value where they apply; they are also available as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        column: str | None = None,
        value: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.column = column
        self.value = value


def _readonly(values: Any, dtype: type) -> np.ndarray:
    """A read-only 1-D copy of ``values`` with ``dtype``."""
    array = np.array(values, dtype=dtype, copy=True)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Workload:
    """One episode's requests, sorted by arrival.

    :param arrival_times: arrival times (seconds from episode start), non-decreasing, first >= 0.
    :param prompt_tokens: prompt lengths (tokens, >= 1).
    :param output_tokens: output lengths (tokens, >= 1).
    :param num_clipped: requests shortened by ``oversize_policy="clip"`` (they are in the arrays).
    :param num_rejected: requests dropped by ``oversize_policy="reject"`` (not in the arrays).
    :param chains: per request, its prompt's block identities
        (:class:`~llm_cluster_env.sim.prefix_cache.PrefixChain`, see
        :mod:`llm_cluster_env.workload.prefix`), or ``None`` when prompts share nothing.

    Arrays are converted to float64/int64, validated and made read-only.
    """

    arrival_times: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    num_clipped: int = 0
    num_rejected: int = 0
    chains: tuple | None = None

    def __post_init__(self) -> None:
        times = _readonly(self.arrival_times, np.float64)
        prompt = _readonly(self.prompt_tokens, np.int64)
        output = _readonly(self.output_tokens, np.int64)
        if not len(times) == len(prompt) == len(output):
            raise ValueError(
                f"Workload arrays differ in length: arrival_times {len(times)}, "
                f"prompt_tokens {len(prompt)}, output_tokens {len(output)}"
            )
        if len(times) and not (np.all(np.isfinite(times)) and times[0] >= 0):
            raise ValueError("Workload.arrival_times must be finite and start at >= 0 seconds")
        if np.any(np.diff(times) < 0):
            raise ValueError("Workload.arrival_times must be non-decreasing")
        if np.any(prompt < 1) or np.any(output < 1):
            raise ValueError("Workload token counts must be >= 1")
        if self.num_clipped < 0 or self.num_rejected < 0:
            raise ValueError("Workload.num_clipped and num_rejected must be >= 0")
        if self.chains is not None:
            object.__setattr__(self, "chains", tuple(self.chains))
            if len(self.chains) != len(times):
                raise ValueError(f"Workload.chains has {len(self.chains)} entries for "
                                 f"{len(times)} requests")
        object.__setattr__(self, "arrival_times", times)
        object.__setattr__(self, "prompt_tokens", prompt)
        object.__setattr__(self, "output_tokens", output)
        object.__setattr__(self, "num_clipped", int(self.num_clipped))
        object.__setattr__(self, "num_rejected", int(self.num_rejected))

    def __len__(self) -> int:
        """Number of requests in the episode (after rejection)."""
        return len(self.arrival_times)

    def __eq__(self, other: object) -> bool:
        """Equal when all arrays and counters are equal."""
        if not isinstance(other, Workload):
            return NotImplemented
        return (
            np.array_equal(self.arrival_times, other.arrival_times)
            and np.array_equal(self.prompt_tokens, other.prompt_tokens)
            and np.array_equal(self.output_tokens, other.output_tokens)
            and self.num_clipped == other.num_clipped
            and self.num_rejected == other.num_rejected
            and self.chains == other.chains
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Trace:
    """A validated trace file (see :func:`load_trace`).

    :param arrival_times: arrival times as written in the file (seconds), non-decreasing, >= 0.
    :param prompt_tokens: ``num_prefill_tokens`` (tokens, >= 1).
    :param output_tokens: ``num_decode_tokens`` (tokens, >= 1).
    :param path: the file the trace was read from.
    :param line_numbers: 1-based file line of each row (header = line 1); ``None`` means
        ``row + 2`` (no blank lines).
    :param segments: Mooncake traces: per row, the prompt's hash blocks as interned segment
        ids (see :mod:`llm_cluster_env.workload.prefix`); ``None`` for CSV traces.
    :param session_keys: Mooncake traces: per row, the segment of the first two blocks.
    :param hash_block_tokens: Mooncake traces: tokens per hash block.
    :param num_segments: Mooncake traces: number of distinct segment ids.
    """

    arrival_times: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    path: str
    line_numbers: np.ndarray | None = None
    segments: tuple[tuple[int, ...], ...] | None = None
    session_keys: np.ndarray | None = None
    hash_block_tokens: int | None = None
    num_segments: int = 0

    def __len__(self) -> int:
        """Number of rows (requests)."""
        return len(self.arrival_times)

    @property
    def span_s(self) -> float:
        """Last minus first arrival time (seconds)."""
        return float(self.arrival_times[-1] - self.arrival_times[0]) if len(self) else 0.0

    @property
    def mean_qps(self) -> float:
        """Mean arrival rate ``(rows - 1) / span`` (requests/s); ``nan`` without a time span."""
        span = self.span_s
        return (len(self) - 1) / span if span > 0 else math.nan

    def line_of(self, row: int) -> int:
        """1-based file line of row ``row`` (0-based data row)."""
        if self.line_numbers is None:
            return int(row) + 2
        return int(self.line_numbers[row])


# --------------------------------------------------------------------------------------------
# Trace files
# --------------------------------------------------------------------------------------------


def _trace_error(path: str, line: int | None, column: str | None, value: str | None,
                 problem: str) -> TraceError:
    """Build a :class:`TraceError` whose message names file, line, column and value."""
    where = path if line is None else f"{path}, line {line}"
    if column is not None:
        where += f", column {column!r}"
    detail = problem if value is None else f"{problem} (value {value!r})"
    return TraceError(f"{where}: {detail}", path=path, line=line, column=column, value=value)


def _header_indices(path: str, header: list[str]) -> dict[str, int]:
    """Map each required column to its index in ``header``; raise naming missing columns."""
    names = [name.strip() for name in header]
    for name in TRACE_COLUMNS:
        if names.count(name) > 1:
            raise _trace_error(path, 1, name, None, "column appears more than once in the header")
    missing = [name for name in TRACE_COLUMNS if name not in names]
    if missing:
        raise _trace_error(
            path, 1, None, None,
            f"missing column(s) {', '.join(repr(m) for m in missing)} in the header; "
            f"found columns {names!r}; a trace needs {', '.join(TRACE_COLUMNS)}",
        )
    return {name: names.index(name) for name in TRACE_COLUMNS}


def _parse_number(path: str, line: int, column: str, raw: str) -> float:
    """``raw`` as a finite float; raise naming the cell otherwise."""
    try:
        value = float(raw)
    except ValueError:
        raise _trace_error(path, line, column, raw, "not a number") from None
    if not math.isfinite(value):
        raise _trace_error(path, line, column, raw, "must be a finite number (not NaN or inf)")
    return value


def _parse_tokens(path: str, line: int, column: str, raw: str) -> int:
    """``raw`` as a whole token count >= 1 (``"12.0"`` is accepted as 12)."""
    value = _parse_number(path, line, column, raw)
    if not value.is_integer():
        raise _trace_error(path, line, column, raw, "token count must be a whole number")
    if value < 1:
        raise _trace_error(path, line, column, raw, "token count must be >= 1")
    if value >= _MAX_TOKENS:
        raise _trace_error(path, line, column, raw, "token count is implausibly large")
    return int(value)


def _parse_arrival(path: str, line: int, raw: str, previous: float, previous_line: int) -> float:
    """``raw`` as an arrival time (seconds) >= 0 and >= the previous row's."""
    value = _parse_number(path, line, _ARRIVAL_COLUMN, raw)
    if value < 0:
        raise _trace_error(path, line, _ARRIVAL_COLUMN, raw, "arrival time must be >= 0 seconds")
    if value < previous:
        raise _trace_error(
            path, line, _ARRIVAL_COLUMN, raw,
            f"arrival time goes backwards: the previous row (line {previous_line}) arrived at "
            f"{previous!r} s; arrivals must be non-decreasing",
        )
    return value


def _parse_rows(path: str, reader: Any, index: dict[str, int],
                width: int) -> tuple[list[float], list[int], list[int], list[int]]:
    """Parse and validate every data row; returns arrivals, prompts, outputs, line numbers."""
    arrivals: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    lines: list[int] = []
    i_arrival, i_prompt, i_output = (index[name] for name in TRACE_COLUMNS)
    previous, previous_line = -math.inf, 0
    for row in reader:
        line = reader.line_num
        if not row:
            continue  # a blank line
        if len(row) != width:
            raise _trace_error(path, line, None, ",".join(row),
                               f"expected {width} comma-separated fields, found {len(row)}")
        previous = _parse_arrival(path, line, row[i_arrival].strip(), previous, previous_line)
        previous_line = line
        arrivals.append(previous)
        prompts.append(_parse_tokens(path, line, _PROMPT_COLUMN, row[i_prompt].strip()))
        outputs.append(_parse_tokens(path, line, _OUTPUT_COLUMN, row[i_output].strip()))
        lines.append(line)
    return arrivals, prompts, outputs, lines


def _read_trace_file(path: str) -> tuple[list[float], list[int], list[int], list[int]]:
    """Open ``path`` and parse it (see :func:`load_trace`)."""
    if not os.path.exists(path):
        raise _trace_error(path, None, None, None, "trace file not found")
    if not os.path.isfile(path):
        raise _trace_error(path, None, None, None, "not a regular file")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            while header is not None and not header:  # leading blank lines
                header = next(reader, None)
            if header is None:
                raise _trace_error(path, 1, None, None,
                                   f"file is empty; expected a header line "
                                   f"{','.join(TRACE_COLUMNS)!r} and one row per request")
            index = _header_indices(path, header)
            return _parse_rows(path, reader, index, len(header))
        except csv.Error as err:
            raise _trace_error(path, reader.line_num, None, None, f"malformed CSV: {err}") from None
        except UnicodeDecodeError as err:
            raise _trace_error(path, None, None, None, f"not a UTF-8 text file: {err}") from None


def load_trace(path: str | os.PathLike[str], trace_format: str = "auto",
               hash_block_tokens: int = 512) -> Trace:
    """Parse and validate a trace CSV with columns ``arrived_at,num_prefill_tokens,num_decode_tokens``
    (or, with ``trace_format="mooncake"`` or ``"auto"`` and a ``.jsonl`` path, a Mooncake JSONL
    trace with ``hash_block_tokens``-token hash blocks: see
    :func:`llm_cluster_env.workload.prefix.load_mooncake_trace`).

    Other columns are ignored; blank lines are skipped. ``arrived_at`` is in seconds; token
    counts must be whole numbers >= 1 (``"12.0"`` is accepted). Arrays are read-only.

    :raises TraceError: the file is missing, empty or has no data rows; a required column is
        missing (the message lists the columns found); a row has the wrong number of fields; a
        value is non-numeric, NaN or infinite; a token count is <= 0 or not a whole number; an
        arrival time is negative or smaller than the previous row's. Messages name the file,
        the 1-based line (header = line 1), the column and the value.
    """
    from llm_cluster_env.workload.prefix import is_mooncake_path, load_mooncake_trace

    if trace_format == "mooncake" or (trace_format == "auto" and is_mooncake_path(path)):
        return load_mooncake_trace(path, hash_block_tokens)
    name = os.fspath(path)
    arrivals, prompts, outputs, lines = _read_trace_file(name)
    if not arrivals:
        raise _trace_error(name, 1, None, None, "no data rows after the header")
    line_numbers = None
    if lines[-1] != len(lines) + 1:  # blank lines inside: keep the real line of each row
        line_numbers = _readonly(lines, np.int64)
    return Trace(
        arrival_times=_readonly(arrivals, np.float64),
        prompt_tokens=_readonly(prompts, np.int64),
        output_tokens=_readonly(outputs, np.int64),
        path=name,
        line_numbers=line_numbers,
    )


# --------------------------------------------------------------------------------------------
# Packaged empirical length summaries
# --------------------------------------------------------------------------------------------


def _summary_path(name: str) -> Path:
    """Path of the packaged summary ``name`` (no check that it exists)."""
    return DATA_DIR / f"{name}.json"


def available_empirical() -> list[str]:
    """Names of the packaged length summaries (``WorkloadConfig.empirical`` values)."""
    names = []
    for path in sorted(DATA_DIR.glob("*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                if json.load(handle).get("format") == SUMMARY_FORMAT:
                    names.append(path.stem)
        except (OSError, ValueError, AttributeError):
            continue
    return names


@dataclass(frozen=True, eq=False)
class EmpiricalLengths:
    """A joint (prompt, output) length sampler from a packaged summary (module docstring).

    :param name: summary name.
    :param quantile_levels: probability levels of the quantile tables, 0 to 1, increasing.
    :param prompt_quantiles: prompt-length quantiles at those levels (tokens).
    :param output_quantiles: output-length quantiles at those levels (tokens).
    :param prompt_edges: rank-cell edges of the prompt axis, 0 to 1, increasing.
    :param output_edges: rank-cell edges of the output axis, 0 to 1, increasing.
    :param cell_cdf: cumulative cell probabilities, row-major (prompt cell, output cell).
    :param stats: the summary's recorded statistics of the source data.
    """

    name: str
    quantile_levels: np.ndarray
    prompt_quantiles: np.ndarray
    output_quantiles: np.ndarray
    prompt_edges: np.ndarray
    output_edges: np.ndarray
    cell_cdf: np.ndarray
    stats: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> EmpiricalLengths:
        """Build and validate a sampler from a parsed summary; ``source`` names it in errors."""
        if data.get("format") != SUMMARY_FORMAT:
            raise ValueError(f"{source}: not a length summary (format must be {SUMMARY_FORMAT!r})")
        try:
            levels = np.asarray(data["quantile_levels"], dtype=np.float64)
            prompt_q = np.asarray(data["prompt_tokens_quantiles"], dtype=np.float64)
            output_q = np.asarray(data["output_tokens_quantiles"], dtype=np.float64)
            copula = data["copula"]
            prompt_edges = np.asarray(copula["prompt_rank_edges"], dtype=np.float64)
            output_edges = np.asarray(copula["output_rank_edges"], dtype=np.float64)
            counts = np.asarray(copula["counts"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: malformed length summary ({err!r})") from None
        _check_summary_arrays(source, levels, prompt_q, output_q, prompt_edges, output_edges,
                              counts)
        cdf = np.cumsum(counts.ravel()) / counts.sum()
        cdf[-1] = 1.0
        return cls(str(data.get("name", source)), levels, prompt_q, output_q, prompt_edges,
                   output_edges, cdf, dict(data.get("stats", {})))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` joint (prompt, output) lengths (tokens, int64 >= 1) using ``rng``."""
        cell = np.searchsorted(self.cell_cdf, rng.random(n), side="right")
        row, col = np.divmod(cell, len(self.output_edges) - 1)
        u = _uniform_in_cells(self.prompt_edges, row, rng)
        v = _uniform_in_cells(self.output_edges, col, rng)
        return self._tokens(u, self.prompt_quantiles), self._tokens(v, self.output_quantiles)

    def _tokens(self, levels: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
        """Map rank-space points through a quantile table to whole tokens >= 1."""
        values = np.rint(np.interp(levels, self.quantile_levels, quantiles)).astype(np.int64)
        return np.maximum(values, 1)


def _uniform_in_cells(edges: np.ndarray, cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniform point inside each of ``cells`` (intervals ``[edges[c], edges[c+1])``)."""
    low = edges[cells]
    return low + rng.random(len(cells)) * (edges[cells + 1] - low)


def _check_summary_arrays(source: str, levels: np.ndarray, prompt_q: np.ndarray,
                          output_q: np.ndarray, prompt_edges: np.ndarray,
                          output_edges: np.ndarray, counts: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``source`` unless the summary arrays are consistent."""
    problems = []
    if levels.ndim != 1 or len(levels) < 2 or levels[0] != 0 or levels[-1] != 1:
        problems.append("quantile_levels must run from 0 to 1")
    elif np.any(np.diff(levels) <= 0):
        problems.append("quantile_levels must increase")
    for label, table in (("prompt", prompt_q), ("output", output_q)):
        if table.shape != levels.shape or not len(table) or np.any(np.diff(table) < 0) \
                or table[0] < 1:
            problems.append(f"{label}_tokens_quantiles must be non-decreasing, >= 1, one per level")
    for label, edges in (("prompt", prompt_edges), ("output", output_edges)):
        if edges.ndim != 1 or len(edges) < 2 or edges[0] != 0 or edges[-1] != 1 \
                or np.any(np.diff(edges) <= 0):
            problems.append(f"copula.{label}_rank_edges must increase from 0 to 1")
    if counts.shape != (len(prompt_edges) - 1, len(output_edges) - 1) or np.any(counts < 0) \
            or counts.sum() <= 0:
        problems.append("copula.counts must be a non-negative (prompt cells x output cells) grid")
    if problems:
        raise ValueError(f"{source}: malformed length summary: {'; '.join(problems)}")


def load_empirical(name: str) -> EmpiricalLengths:
    """Load the packaged length summary ``name``.

    :raises ConfigError: (a ``ValueError``) for an unknown name, listing the available ones.
    """
    path = _summary_path(name)
    if not _NAME_PATTERN.match(name) or not path.is_file():
        raise ConfigError(
            f"workload.empirical={name!r}: unknown length summary "
            f"(available: {', '.join(available_empirical()) or 'none'})"
        )
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return EmpiricalLengths.from_dict(data, str(path))


# --------------------------------------------------------------------------------------------
# Arrival processes
# --------------------------------------------------------------------------------------------


def poisson_arrivals(n: int, qps: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` Poisson arrival times (seconds) at ``qps`` requests/s; the first is one gap after 0."""
    return np.cumsum(rng.exponential(1.0 / qps, n))


def gamma_arrivals(n: int, qps: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` renewal arrival times (seconds) with gamma gaps of mean ``1/qps`` and CV ``cv``."""
    return np.cumsum(rng.gamma(1.0 / cv**2, cv**2 / qps, n))


def phase_arrivals(n: int, phases: Sequence[PhaseConfig], cv: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times (seconds) of cyclically repeated load phases (module docstring).

    Each phase occurrence (a *segment*) runs a fresh gamma renewal process from its start with
    the phase's ``qps`` and CV ``cv``; the gap crossing its end is discarded. Segments are drawn
    in vectorised blocks: every segment gets enough gaps to cover it with overwhelming
    probability (mean + 6 sd + 8) or at least the arrivals still needed; the rare segment that
    is still not covered is extended one batch at a time.
    """
    durations = np.array([p.duration_s for p in phases], dtype=np.float64)
    rates = np.array([p.qps for p in phases], dtype=np.float64)
    expected = durations * rates
    budgets = np.ceil(expected + 6.0 * cv * np.sqrt(expected) + 8.0).astype(np.int64)
    chunks: list[np.ndarray] = []
    have, first_segment, start_time = 0, 0, 0.0
    while have < n:
        need = n - have
        segments = _block_segments(need, first_segment, expected, budgets)
        block, end_time = _draw_segment_block(segments, need, durations, rates, budgets, cv,
                                              start_time, rng)
        chunks.append(block)
        have += len(block)
        first_segment += len(segments)
        start_time = end_time
    return np.sort(np.concatenate(chunks) if chunks else np.empty(0))[:n]


def _block_segments(need: int, first_segment: int, expected: np.ndarray,
                    budgets: np.ndarray) -> np.ndarray:
    """Global indices of the next block of segments: ~1.2x the arrivals still needed."""
    num_phases = len(expected)
    cycles = (1.2 * need + 16.0) / expected.sum()
    count = int(math.ceil(cycles * num_phases)) + 1
    max_count = max(1, _MAX_DRAWS_PER_BLOCK // int(budgets.mean()))
    return first_segment + np.arange(min(count, max_count))


def _draw_segment_block(segments: np.ndarray, need: int, durations: np.ndarray,
                        rates: np.ndarray, budgets: np.ndarray, cv: float, start_time: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Arrival times (seconds, unsorted) in a block of segments, and the block's end time."""
    phase = segments % len(durations)
    length = durations[phase]
    starts = start_time + np.concatenate(([0.0], np.cumsum(length)[:-1]))
    cap = int(math.ceil(need + 6.0 * cv * math.sqrt(need) + 16.0))
    draws = np.minimum(budgets[phase], cap)  # a capped segment alone yields >= need arrivals
    shape, scale = 1.0 / cv**2, cv**2 / rates[phase]
    gaps = rng.gamma(shape, 1.0, int(draws.sum())) * np.repeat(scale, draws)
    owner = np.repeat(np.arange(len(segments)), draws)
    total = np.cumsum(gaps)
    last = np.cumsum(draws) - 1
    base = np.concatenate(([0.0], total[last[:-1]]))
    offset = total - base[owner]
    keep = offset < length[owner]
    times = [starts[owner[keep]] + offset[keep]]
    short = (offset[last] < length) & (draws < cap)
    for seg in np.flatnonzero(short):  # rare: extend uncovered segments to their end
        extra = _extend_segment(offset[last[seg]], length[seg], shape, scale[seg],
                                int(draws[seg]), rng)
        times.append(starts[seg] + extra)
    return np.concatenate(times), float(starts[-1] + length[-1])


def _extend_segment(offset: float, length: float, shape: float, scale: float, batch: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Further arrival offsets (seconds) of a segment from ``offset`` until ``length``."""
    extra = []
    while offset < length:
        cumulative = offset + np.cumsum(rng.gamma(shape, scale, batch))
        extra.append(cumulative[cumulative < length])
        offset = float(cumulative[-1])
    return np.concatenate(extra) if extra else np.empty(0)


def trace_window(trace: Trace, n: int, start: int,
                 trace_qps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times (seconds from 0) and row indices of rows ``[start, start + n)`` of ``trace``
    (how often each wrapped: ``(start + arange(n)) // len(trace)``).

    Rows past the end wrap to row 0 one period (``span + mean_gap``) later (module docstring);
    ``trace_qps`` rescales the time axis so the repeated trace's mean rate is ``trace_qps``.
    """
    rows_total = len(trace)
    cycle, rows = np.divmod(start + np.arange(n, dtype=np.int64), rows_total)
    t = trace.arrival_times
    span = float(t[-1] - t[0])
    mean_gap = span / (rows_total - 1)
    times = (t[rows] - t[0]) + cycle * (span + mean_gap)
    times = times - times[0] if n else times
    if trace_qps is not None:
        times = times * ((1.0 / mean_gap) / trace_qps)
    return times, rows


# --------------------------------------------------------------------------------------------
# Oversize policy
# --------------------------------------------------------------------------------------------


def lognormal_tokens(n: int, median: float, sigma: float, rng: np.random.Generator
                     ) -> np.ndarray:
    """``n`` token counts ``max(1, round(median * exp(sigma * z)))``, ``z`` standard normal
    (int64; capped at 2**31 tokens, far above any context window)."""
    values = median * np.exp(sigma * rng.standard_normal(n))
    return np.clip(np.rint(values), 1, 2**31).astype(np.int64)


def clip_lengths(prompt: np.ndarray, output: np.ndarray,
                 max_total: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip to ``prompt + output <= max_total`` (tokens), taking the excess from both lengths in
    proportion to their size, each cut rounded up, and keeping each at least 1 (Vidur's rule).

    Rounding both cuts up removes at least the excess, and a length floored back to 1 was cut by
    more than its share, so the sum never exceeds ``max_total`` (>= 2).
    """
    prompt = np.asarray(prompt, dtype=np.int64)
    output = np.asarray(output, dtype=np.int64)
    total = prompt + output
    excess = np.maximum(total - max_total, 0)
    prompt_cut = -((-excess * prompt) // total)  # ceil(excess * prompt / total), exact in ints
    output_cut = -((-excess * output) // total)
    return np.maximum(prompt - prompt_cut, 1), np.maximum(output - output_cut, 1)


def _oversize_message(index: int, prompt: int, output: int, max_total: int,
                      trace: Trace | None, row: int | None) -> str:
    """Error text for ``oversize_policy="error"``."""
    source = f" (trace line {trace.line_of(row)} of {trace.path})" if trace is not None \
        and row is not None else ""
    return (
        f"request {index}{source}: prompt_tokens={prompt} + output_tokens={output} = "
        f"{prompt + output} tokens exceeds max_total_tokens={max_total}; "
        "oversize_policy='error' (use 'clip' or 'reject', or raise max_total_tokens)"
    )


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


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
        from llm_cluster_env.workload import prefix as prefix_workload

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
        raise ValueError(_oversize_message(index, int(prompt[index]), int(output[index]), cap,
                                           self._trace, row))


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
