"""Trace files: CSV parsing and validation (file, line, column and value in every error), Mooncake dispatch, and the periodic trace window."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np

from llm_cluster_env.workload.requests import Trace, readonly_array, trace_error

#: Columns a trace CSV must have (others are ignored).
TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")

_ARRIVAL_COLUMN, _PROMPT_COLUMN, _OUTPUT_COLUMN = TRACE_COLUMNS
_MAX_TOKENS = 2**53  # token counts must convert to int64 exactly

def _header_indices(path: str, header: list[str]) -> dict[str, int]:
    """Map each required column to its index in ``header``; raise naming missing columns."""
    names = [name.strip() for name in header]
    for name in TRACE_COLUMNS:
        if names.count(name) > 1:
            raise trace_error(path, 1, name, None, "column appears more than once in the header")
    missing = [name for name in TRACE_COLUMNS if name not in names]
    if missing:
        raise trace_error(
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
        raise trace_error(path, line, column, raw, "not a number") from None
    if not math.isfinite(value):
        raise trace_error(path, line, column, raw, "must be a finite number (not NaN or inf)")
    return value


def _parse_tokens(path: str, line: int, column: str, raw: str) -> int:
    """``raw`` as a whole token count >= 1 (``"12.0"`` is accepted as 12)."""
    value = _parse_number(path, line, column, raw)
    if not value.is_integer():
        raise trace_error(path, line, column, raw, "token count must be a whole number")
    if value < 1:
        raise trace_error(path, line, column, raw, "token count must be >= 1")
    if value >= _MAX_TOKENS:
        raise trace_error(path, line, column, raw, "token count is implausibly large")
    return int(value)


def _parse_arrival(path: str, line: int, raw: str, previous: float, previous_line: int) -> float:
    """``raw`` as an arrival time (seconds) >= 0 and >= the previous row's."""
    value = _parse_number(path, line, _ARRIVAL_COLUMN, raw)
    if value < 0:
        raise trace_error(path, line, _ARRIVAL_COLUMN, raw, "arrival time must be >= 0 seconds")
    if value < previous:
        raise trace_error(
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
            raise trace_error(path, line, None, ",".join(row),
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
        raise trace_error(path, None, None, None, "trace file not found")
    if not os.path.isfile(path):
        raise trace_error(path, None, None, None, "not a regular file")
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            while header is not None and not header:  # leading blank lines
                header = next(reader, None)
            if header is None:
                raise trace_error(path, 1, None, None,
                                   f"file is empty; expected a header line "
                                   f"{','.join(TRACE_COLUMNS)!r} and one row per request")
            index = _header_indices(path, header)
            return _parse_rows(path, reader, index, len(header))
        except csv.Error as err:
            raise trace_error(path, reader.line_num, None, None, f"malformed CSV: {err}") from None
        except UnicodeDecodeError as err:
            raise trace_error(path, None, None, None, f"not a UTF-8 text file: {err}") from None


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
        raise trace_error(name, 1, None, None, "no data rows after the header")
    line_numbers = None
    if lines[-1] != len(lines) + 1:  # blank lines inside: keep the real line of each row
        line_numbers = readonly_array(lines, np.int64)
    return Trace(
        arrival_times=readonly_array(arrivals, np.float64),
        prompt_tokens=readonly_array(prompts, np.int64),
        output_tokens=readonly_array(outputs, np.int64),
        path=name,
        line_numbers=line_numbers,
    )



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
