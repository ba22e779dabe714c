"""Arrival processes: Poisson, gamma and cyclic phases (see the package docs); every draw from the generator passed in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llm_cluster_env.config import PhaseConfig

_MAX_DRAWS_PER_BLOCK = 1 << 21  # memory bound of one vectorised block of phase gaps

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
