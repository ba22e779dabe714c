"""Request containers: one episode's requests (:class:`Workload`), a parsed trace (:class:`Trace`) and trace errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


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


def readonly_array(values: Any, dtype: type) -> np.ndarray:
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
        (:class:`~llm_cluster_env.prefix_chain.PrefixChain`, see
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
        times = readonly_array(self.arrival_times, np.float64)
        prompt = readonly_array(self.prompt_tokens, np.int64)
        output = readonly_array(self.output_tokens, np.int64)
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



def trace_error(path: str, line: int | None, column: str | None, value: str | None,
                 problem: str) -> TraceError:
    """Build a :class:`TraceError` whose message names file, line, column and value."""
    where = path if line is None else f"{path}, line {line}"
    if column is not None:
        where += f", column {column!r}"
    detail = problem if value is None else f"{problem} (value {value!r})"
    return TraceError(f"{where}: {detail}", path=path, line=line, column=column, value=value)
