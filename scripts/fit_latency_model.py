"""Refit the per-iteration latency coefficients from Vidur's public GPU profiling CSVs.

Reads the raw data (never copied into the project) from ``--data-dir`` (default
``../shared/data/vidur`` next to the checkout) and writes one JSON file per shipped
(model, GPU, tensor-parallel) combination to ``--out-dir`` (default
``llm_cluster_env/sim/coefficients``). ``--check`` only prints the per-operation fit errors
(MAPE and leave-one-out MAPE on the profiling rows) and whether the shipped files match a
fresh fit.

The model itself, its units and every assumption are described in
:mod:`llm_cluster_env.sim.latency` and ``docs/latency_calibration.md``. This script uses only
the standard library and numpy, so the tests can import it and call :func:`fit_combination`.

Usage::

    python scripts/fit_latency_model.py            # refit and rewrite the JSON files
    python scripts/fit_latency_model.py --check    # report per-operation MAPE, write nothing
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from llm_cluster_env.hardware import GPUS, MODELS, GPUSpec, ModelSpec
except ImportError:  # run as a plain script from a checkout that is not installed
    sys.path.insert(0, str(REPO_ROOT))
    from llm_cluster_env.hardware import GPUS, MODELS, GPUSpec, ModelSpec

#: Same convention as tests/conftest.py: ``$LLM_CLUSTER_VIDUR_DATA`` or ../shared/data/vidur.
DEFAULT_DATA_DIR = Path(os.environ.get("LLM_CLUSTER_VIDUR_DATA") or REPO_ROOT.parent / "shared" / "data" / "vidur")
DEFAULT_OUT_DIR = REPO_ROOT / "llm_cluster_env" / "sim" / "coefficients"

SCHEMA_VERSION = 3
VIDUR_REPOSITORY = "https://github.com/microsoft/vidur"
VIDUR_COMMIT = "7d47513363ec447a741ac5e47241580b47724fbf"  # from the data README

#: (model, gpu, tensor_parallel) combinations that are fitted and shipped.
SHIPPED: tuple[tuple[str, str, int], ...] = (
    ("llama-2-7b", "a100", 1),
    ("llama-2-7b", "a100", 2),
    ("llama-2-7b", "h100", 1),
    ("llama-2-7b", "h100", 2),
    ("llama-2-7b", "a40", 1),
    ("llama-3-8b", "a100", 1),
    ("llama-3-8b", "a100", 2),
    ("llama-3.1-8b", "a100", 1),
    ("llama-3.1-8b", "a100", 2),
    ("llama-2-70b", "a100", 4),
    ("llama-2-70b", "a100", 8),
    ("llama-2-70b", "h100", 4),
    ("llama-2-70b", "h100", 8),
)

#: Registry name -> Hugging Face id used as Vidur's profiling folder.
HF_IDS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Meta-Llama-3-8B",  # same shapes; Vidur has no 3.1 profile
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
}
#: Models whose coefficients reuse another model's profiles (identical layer shapes), and why.
PROFILES_REUSED = {
    "llama-3.1-8b": (
        "Llama-3.1-8B has Llama-3-8B's layer shapes (32 layers, hidden 4096, 32 query / 8 KV "
        "heads, MLP 14336, vocab 128256); only its RoPE scaling and 131,072-token window differ, "
        "which change no kernel time at a given token count. Its tables are Llama-3-8B's "
        "profiles (meta-llama/Meta-Llama-3-8B/mlp.csv); contexts past the profiled 4,096 tokens "
        "are extrapolated (see docs/latency_calibration.md, 'Long contexts')."
    ),
}
#: GPU -> network profile folder: the SXM parts sit in NVSwitch (DGX/HGX) nodes. (The A40
#: data has no all-reduce profile, so A40 ships at TP1 only.)
NETWORK_NODES = {"a100": "a100_dgx", "h100": "h100_dgx"}

#: Attention kernels were profiled only for this combination; all others are scaled from it.
REFERENCE = ("llama-2-7b", "a100", 1)
ATTENTION_DIR = "profiling/compute/a100/meta-llama/Llama-2-7b-hf"
ATTENTION_FILES = ("attention_rows_tp1.csv", "attention_sampled.csv")

#: Decode attention table knots: batch sizes (requests) and mean context lengths (tokens per
#: request). Dense at small batches, where the kernel's occupancy changes fastest; the context
#: knots 224/256 and 480/512 carry the steps the profile shows when the context crosses 256 and
#: 512 tokens (the kernel's KV split changes); 4,096 is the largest profiled context, and the
#: 1,024-4,096 segment (the slope used past 4,096 tokens) averages over the longest profiled rows.
DECODE_BATCH_KNOTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128)
DECODE_CONTEXT_KNOTS = (0, 224, 256, 480, 512, 1024, 4096)

#: mlp.csv operations run once per transformer layer (Vidur's own sum: both norms, the attention
#: projections and RoPE, the gated MLP, and one residual ``add``).
PER_LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
#: Once per iteration, as (name in the JSON, mlp.csv operation timed): the token embedding
#: lookup and the final RMSNorm (timed as one more ``input_layernorm``). The LM head is added
#: separately (see :func:`fit_non_attention`).
ONCE_PER_ITERATION_OPS = (("emb", "emb"), ("final_norm", "input_layernorm"))

#: CPU-side work per iteration (scheduling, input preparation, sampling), not in these CSVs.
#: Rounded from a least-squares line through Vidur's own CPU profile of Llama-2-7B, TP1, A100
#: (microsoft/vidur ``data/profiling/a100/cpu_overheads.csv``, older commit, batch 8..64):
#: SCHEDULE + SAMPLER_E2E + PREPARE_INPUTS_E2E medians = 1.04 ms + 37.6 us per request.
#: PROCESS_MODEL_OUTPUTS (detokenisation, ~60 us/request there) is left out because vLLM >= 0.6
#: overlaps it with the next GPU step. An assumption: override with ``overhead_s``.
CPU_OVERHEAD_PER_ITERATION_S = 1.0e-3
CPU_OVERHEAD_PER_REQUEST_S = 3.8e-5

#: Tables are extrapolated past their last point with the least-squares slope of the points at
#: or above this fraction of the last num_tokens (a single last segment is too noisy).
EXTRAPOLATION_TAIL_FRACTION = 0.5


# --------------------------------------------------------------------------- raw data


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _is_true(text: str) -> bool:
    return text.strip().lower() in {"true", "1"}


@dataclass(frozen=True)
class AttentionRow:
    """One distinct attention key of the reference profile and its measured medians."""

    tensor_parallel: int
    is_prefill: bool
    batch_size: int
    prefill_chunk_size: int
    kv_cache_size: int
    measured_ms: tuple[float, ...]  # per layer, one per profiling row with this key

    @property
    def time_ms(self) -> float:
        """Mean of the measurements (ms per layer): what the fits use."""
        return float(np.mean(self.measured_ms))


class VidurData:
    """Lazy, cached access to the raw CSVs under one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"Vidur data directory not found: {self.data_dir}")
        self._mlp: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._network: dict[str, list[dict[str, str]]] = {}

    def mlp_path(self, model: str, gpu: str) -> Path:
        return self.data_dir / "profiling" / "compute" / gpu / HF_IDS[model] / "mlp.csv"

    def network_path(self, gpu: str) -> Path:
        return self.data_dir / "profiling" / "network" / NETWORK_NODES[gpu] / "all_reduce.csv"

    def mlp(self, model: str, gpu: str) -> list[dict[str, str]]:
        key = (model, gpu)
        if key not in self._mlp:
            self._mlp[key] = read_csv(self.mlp_path(model, gpu))
        return self._mlp[key]

    def all_reduce(self, gpu: str) -> list[dict[str, str]]:
        if gpu not in self._network:
            self._network[gpu] = read_csv(self.network_path(gpu))
        return self._network[gpu]

    @cached_property
    def reference_attention(self) -> dict:
        """The reference attention fit (:func:`fit_reference_attention`), computed once."""
        return fit_reference_attention(self.attention)

    @cached_property
    def attention(self) -> list[AttentionRow]:
        """Every attention row of the reference profile, one per distinct key.

        The two files overlap; the README reports that overlapping keys agree (one key was
        measured twice in the original): the fits use their mean, the MAPE every row.
        """
        grouped: dict[tuple, list[float]] = defaultdict(list)
        for name in ATTENTION_FILES:
            for row in read_csv(self.data_dir / ATTENTION_DIR / name):
                prefill = _is_true(row["is_prefill"])
                column = "time_stats.attn_prefill.median" if prefill else "time_stats.attn_decode.median"
                key = (
                    int(row["num_tensor_parallel_workers"]),
                    prefill,
                    int(row["batch_size"]),
                    int(row["prefill_chunk_size"]),
                    int(row["kv_cache_size"]),
                )
                grouped[key].append(float(row[column]))
        return [
            AttentionRow(tp, prefill, batch, chunk, kv, tuple(times))
            for (tp, prefill, batch, chunk, kv), times in sorted(grouped.items())
        ]


# --------------------------------------------------------------------------- helpers


def isotonic_increasing(values: Iterable[float]) -> np.ndarray:
    """Least-squares non-decreasing fit (pool-adjacent-violators, equal weights)."""
    means: list[float] = []
    counts: list[int] = []
    for value in values:
        means.append(float(value))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, c2 = means.pop(), counts.pop()
            m1, c1 = means.pop(), counts.pop()
            means.append((m1 * c1 + m2 * c2) / (c1 + c2))
            counts.append(c1 + c2)
    return np.repeat(np.array(means), counts)


def tail_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of the points with x >= EXTRAPOLATION_TAIL_FRACTION * max(x)."""
    tail = x >= EXTRAPOLATION_TAIL_FRACTION * x[-1]
    return float(np.polyfit(x[tail].astype(float), y[tail], 1)[0])


def interp_extrap(x: np.ndarray, grid: np.ndarray, values: np.ndarray, slope: float) -> np.ndarray:
    """Piecewise-linear on ``grid``, constant below it, linear with ``slope`` above it."""
    x = np.asarray(x, dtype=float)
    inside = np.interp(x, grid, values)
    return np.where(x > grid[-1], values[-1] + slope * (x - grid[-1]), inside)


def mape_percent(predicted: np.ndarray, measured: np.ndarray) -> float:
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    return float(np.mean(np.abs(predicted - measured) / measured) * 100.0)


def relative_least_squares(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Coefficients minimising the summed squared *relative* error (rows weighted by 1/y)."""
    weights = 1.0 / measured
    coefficients, *_ = np.linalg.lstsq(design * weights[:, None], measured * weights, rcond=None)
    return coefficients


def check_shape(rows: list[dict[str, str]], spec: ModelSpec, path: Path) -> None:
    """The profiled shape must be the registry's (vocab differs: Vidur pads it to 32768)."""
    row = rows[0]
    profiled = (int(row["n_head"]), int(row["n_kv_head"]), int(row["n_embd"]), int(row["n_expanded_embd"]))
    expected = (spec.num_q_heads, spec.num_kv_heads, spec.hidden_size, spec.intermediate_size)
    if profiled != expected:
        raise ValueError(f"{path}: shape {profiled} != registry {spec.name} {expected}")


# --------------------------------------------------------------------------- fits


@dataclass(frozen=True, eq=False)
class TableFit:
    """One operation's shipped table and its errors on the profiling rows.

    The table is the isotonic (least-squares non-decreasing) fit of the per-x means of the
    measured medians (duplicate x averaged), piecewise-linear between grid points and linear
    with ``slope`` past the last one. Times in ms, x in tokens (or bytes for all-reduce).
    """

    grid: np.ndarray  # distinct profiled x, ascending
    table: np.ndarray  # ms at each grid point, non-decreasing
    slope: float  # ms per unit x past grid[-1]
    row_x: np.ndarray  # every profiling row (duplicates included)
    row_y: np.ndarray  # its measured median, ms
    loo: np.ndarray  # ms at grid[1:-1], each from the table refitted without that point

    @classmethod
    def from_rows(cls, row_x: Iterable[float], row_y: Iterable[float]) -> TableFit:
        x, y = np.asarray(list(row_x), float), np.asarray(list(row_y), float)
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        grid, inverse = np.unique(x, return_inverse=True)
        means = np.bincount(inverse, weights=y) / np.bincount(inverse)
        table = isotonic_increasing(means)
        return cls(grid, table, tail_slope(grid, table), x, y, leave_one_out(grid, means))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return interp_extrap(x, self.grid, self.table, self.slope)

    def mape(self, max_x: float = math.inf) -> float:
        """MAPE (%) of the table on every profiling row with x <= max_x."""
        used = self.row_x <= max_x
        return mape_percent(self.predict(self.row_x[used]), self.row_y[used])

    def loo_mape(self, max_x: float = math.inf) -> float:
        """MAPE (%) of the leave-one-out predictions on the rows at interior grid points."""
        return loo_mape_percent(self.grid, self.loo, self.row_x, self.row_y, max_x)


def leave_one_out(grid: np.ndarray, means: np.ndarray) -> np.ndarray:
    """At each interior grid point, the isotonic table fitted without it, interpolated there."""
    predictions = []
    for i in range(1, len(grid) - 1):
        rest_x, rest_y = np.delete(grid, i), isotonic_increasing(np.delete(means, i))
        predictions.append(float(np.interp(grid[i], rest_x, rest_y)))
    return np.array(predictions)


def loo_mape_percent(
    grid: np.ndarray, loo: np.ndarray, row_x: np.ndarray, row_y: np.ndarray, max_x: float = math.inf
) -> float:
    """MAPE (%) of leave-one-out predictions ``loo`` (at ``grid[1:-1]``) on the rows there."""
    interior = (row_x > grid[0]) & (row_x < grid[-1]) & (row_x <= max_x)
    index = np.searchsorted(grid, row_x[interior]) - 1
    return mape_percent(loo[index], row_y[interior])


def mlp_op_fits(rows: list[dict[str, str]], ops: Iterable[str]) -> dict[str, TableFit]:
    """One :class:`TableFit` per ``mlp.csv`` operation over ``num_tokens``."""
    x = [int(r["num_tokens"]) for r in rows]
    return {op: TableFit.from_rows(x, (float(r[f"time_stats.{op}.median"]) for r in rows)) for op in ops}


def op_entry(fit: TableFit, column: str) -> dict:
    """JSON entry of one operation's table: the CSV column, ms per grid point, tail slope."""
    return {"column": column, "ms": fit.table.tolist(), "extrapolation_slope_ms_per_token": fit.slope}


def fit_non_attention(rows: list[dict[str, str]], spec: ModelSpec, tensor_parallel: int) -> dict:
    """One non-decreasing table per ``mlp.csv`` operation (ms) on the profiled num_tokens grid.

    Per-layer ops (:data:`PER_LAYER_OPS`) in ms per layer; the once-per-iteration embedding and
    final norm (timed as one more ``input_layernorm``) in ms per iteration. Each table is the
    isotonic fit of that op's medians (duplicate num_tokens averaged), so a bigger batch is
    never faster. The per-iteration total the simulator uses is
    ``num_layers * sum(per-layer tables) + sum(once-per-iteration tables)``.

    LM head (not profiled): a GEMM of the same [tokens x hidden] input as ``mlp_up_proj`` with
    ``vocab / up_width`` times as many output columns (both split across TP), so its table is
    the ``mlp_up_proj`` table times that ratio, evaluated at the number of logit rows (one per
    scheduled request) rather than at num_tokens.

    MAPE (%) per op and of the summed total on every profiling row (duplicates included), and
    of leave-one-out predictions (each interior grid point from the tables refitted without it).
    """
    tp_rows = [r for r in rows if int(r["num_tensor_parallel_workers"]) == tensor_parallel]
    if not tp_rows:
        raise ValueError(f"no mlp.csv rows for TP{tensor_parallel}")
    measured_ops = tuple(dict.fromkeys(PER_LAYER_OPS + tuple(op for _, op in ONCE_PER_ITERATION_OPS)))
    fits = mlp_op_fits(tp_rows, measured_ops)
    grid = fits[PER_LAYER_OPS[0]].grid
    if any(not np.array_equal(fit.grid, grid) for fit in fits.values()):
        raise ValueError("mlp.csv operations were profiled on different num_tokens grids")

    # The summed per-iteration total: shipped table, measured rows, leave-one-out predictions.
    layers = spec.num_layers
    once = [fits[op] for _, op in ONCE_PER_ITERATION_OPS]
    total = layers * sum(fits[op].table for op in PER_LAYER_OPS) + sum(f.table for f in once)
    total_slope = layers * sum(fits[op].slope for op in PER_LAYER_OPS) + sum(f.slope for f in once)
    total_loo = layers * sum(fits[op].loo for op in PER_LAYER_OPS) + sum(f.loo for f in once)
    row_x = fits[PER_LAYER_OPS[0]].row_x
    row_total = layers * sum(fits[op].row_y for op in PER_LAYER_OPS) + sum(f.row_y for f in once)
    mape = {}
    for op in measured_ops:
        mape[op] = fits[op].mape()
        mape[f"{op}_leave_one_out"] = fits[op].loo_mape()
    mape["non_attention"] = mape_percent(interp_extrap(row_x, grid, total, total_slope), row_total)
    mape["non_attention_leave_one_out"] = loo_mape_percent(grid, total_loo, row_x, row_total)

    gated = _is_true(tp_rows[0]["use_gated_mlp"])
    up_width = spec.intermediate_size * (2 if gated else 1)
    lm_ratio = spec.vocab_size / up_width
    lm_table = fits["mlp_up_proj"].table * lm_ratio
    return {
        "num_tokens": grid.astype(int).tolist(),
        "profiling_rows": len(tp_rows),
        "per_layer_ops_ms": {op: op_entry(fits[op], f"time_stats.{op}.median") for op in PER_LAYER_OPS},
        "once_per_iteration_ops_ms": {
            name: op_entry(fits[op], f"time_stats.{op}.median")
            for name, op in ONCE_PER_ITERATION_OPS
        },
        "lm_head": {
            "over_mlp_up_proj": lm_ratio,
            "ms": lm_table.tolist(),
            "extrapolation_slope_ms_per_row": tail_slope(grid, lm_table),
        },
        "_mape": mape,
    }


def fit_all_reduce(rows: list[dict[str, str]], tensor_parallel: int, spec: ModelSpec, grid: np.ndarray) -> dict:
    """Per-iteration tensor-parallel communication (ms) at each num_tokens of ``grid``.

    One all-reduce of ``tokens * hidden * 2`` bytes after attention and one after the MLP in
    every layer, plus one after the vocab-parallel embedding: ``2 * num_layers + 1`` per
    iteration. Single-node rows (``devices_per_node == num_workers``); the medians are noisy
    and bimodal below ~1 MB, so the curve is their isotonic (non-decreasing) fit (duplicate
    sizes averaged), interpolated linearly in bytes and extrapolated past 64 MiB with the slope
    of its upper half. MAPE (%) on every row up to the largest message the table uses.
    """
    selected = [
        (int(r["size"]), float(r["time_stats.all_reduce.median"]))
        for r in rows
        if int(r["num_workers"]) == tensor_parallel and int(r["devices_per_node"]) == tensor_parallel
    ]
    if not selected:
        raise ValueError(f"no single-node all_reduce rows for {tensor_parallel} workers")
    fit = TableFit.from_rows((s for s, _ in selected), (t for _, t in selected))
    bytes_per_token = spec.hidden_size * spec.dtype_bytes
    count = 2 * spec.num_layers + 1
    table = count * fit.predict(grid * bytes_per_token)
    largest = grid[-1] * bytes_per_token
    return {
        "all_reduces_per_iteration": count,
        "profiling_rows": int(np.sum(fit.row_x <= largest)),
        "per_iteration_ms": table.tolist(),
        "extrapolation_slope_ms_per_token": count * fit.slope * bytes_per_token,
        "_mape": {"all_reduce": fit.mape(largest), "all_reduce_leave_one_out": fit.loo_mape(largest)},
    }


def prefill_design(chunk: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Columns of ``e0 + e1*c + e2*c*p + e3*c*c/2 + e4*p`` (per layer, one chunk)."""
    return np.c_[np.ones_like(chunk), chunk, chunk * prior, chunk * chunk / 2.0, prior]


def _rows_arrays(rows: list[AttentionRow], every_row: bool = False) -> tuple[np.ndarray, ...]:
    """(batch, chunk, kv, ms per layer): one entry per distinct key (the mean of its
    measurements) or, with ``every_row``, one per profiling row (duplicates included)."""
    expanded = [(r, t) for r in rows for t in r.measured_ms] if every_row else [(r, r.time_ms) for r in rows]
    return (
        np.array([r.batch_size for r, _ in expanded], float),
        np.array([r.prefill_chunk_size for r, _ in expanded], float),
        np.array([r.kv_cache_size for r, _ in expanded], float),
        np.array([t for _, t in expanded], float),
    )


def piecewise_linear_basis(x: np.ndarray, knots: Iterable[float]) -> np.ndarray:
    """Hat functions of linear interpolation on ``knots``: row i holds the weights with which
    each knot value enters the interpolant at ``x[i]`` (clamped to the first/last knot)."""
    x, knots = np.asarray(x, float), np.asarray(list(knots), float)
    basis = np.empty((len(x), len(knots)))
    for j in range(len(knots)):
        unit = np.zeros(len(knots))
        unit[j] = 1.0
        basis[:, j] = np.interp(x, knots, unit)
    return basis


def decode_table_design(batch: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Bilinear weights of the decode-table entries (row-major: batch knot, then context knot)
    at each (batch size B, mean context L) pair (inside the knot ranges)."""
    wb = piecewise_linear_basis(batch, DECODE_BATCH_KNOTS)
    wl = piecewise_linear_basis(context, DECODE_CONTEXT_KNOTS)
    return (wb[:, :, None] * wl[:, None, :]).reshape(len(batch), -1)


def _cumulative_table_map() -> np.ndarray:
    """Matrix M with vec(table) = M @ vec(increments): each table entry is the sum of the
    non-negative increments at or below it in both directions (see :func:`fit_decode_table`)."""
    nb, nl = len(DECODE_BATCH_KNOTS), len(DECODE_CONTEXT_KNOTS)
    return np.kron(np.tril(np.ones((nb, nb))), np.tril(np.ones((nl, nl))))


def decode_table_predict(table: np.ndarray, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Decode attention (ms per layer) from ``table`` at (B, L) inside the knot ranges."""
    return decode_table_design(batch, context) @ np.asarray(table, float).ravel()


def batch_deciles(batch: np.ndarray) -> list[tuple[int, int]]:
    """Ten batch-size ranges ``(lo, hi)`` (inclusive) with about equal numbers of keys."""
    edges = np.unique(np.ceil(np.quantile(batch, np.linspace(0.0, 1.0, 11))).astype(int))
    ranges, lo = [], int(batch.min())
    for edge in edges[1:-1]:
        if edge > lo:
            ranges.append((lo, int(edge) - 1))
            lo = int(edge)
    ranges.append((lo, int(batch.max())))
    return ranges


def fit_decode_table(rows: list[AttentionRow]) -> dict:
    """Decode attention (ms per layer) as a table over (batch size B, mean context L).

    Bilinear interpolation between :data:`DECODE_BATCH_KNOTS` x :data:`DECODE_CONTEXT_KNOTS`;
    the table is fitted by least squares on relative error over the distinct keys, subject to
    being non-decreasing in B and in L and to a context slope that grows with B
    (``T[i+1,j+1] - T[i+1,j] >= T[i,j+1] - T[i,j]``: more requests read more KV per extra
    context token). Parametrised as the 2-D cumulative sum of non-negative increments, the
    constrained problem is a non-negative least-squares problem (``scipy.optimize.nnls``).

    Leave-one-out errors are PRESS residuals ``r_i / (1 - h_ii)`` of the weighted least-squares
    problem restricted to the increments the constraints leave free (exact for every key whose
    removal does not change which constraints bind; ``--exact-loo`` refits for every key).
    """
    from scipy.optimize import nnls  # only the refit needs scipy, not the package

    batch, _, context, y = _rows_arrays(rows)
    design = decode_table_design(batch, context) @ _cumulative_table_map()
    weights = 1.0 / y
    system = design * weights[:, None]
    increments, _ = nnls(system, y * weights, maxiter=50 * system.shape[1])
    table = (_cumulative_table_map() @ increments).reshape(len(DECODE_BATCH_KNOTS), len(DECODE_CONTEXT_KNOTS))
    free = increments > 0.0
    q, _ = np.linalg.qr(system[:, free])
    leverage = np.sum(q * q, axis=1)
    relative = (decode_table_predict(table, batch, context) - y) / y
    loo_prediction = y * (1.0 + relative / (1.0 - leverage))
    return {"table": table, "loo_prediction": loo_prediction, "keys": rows}


def decode_errors(rows: list[AttentionRow], table: np.ndarray, loo_prediction: np.ndarray | None = None) -> dict:
    """MAPE (%) of ``table`` on every profiling row of ``rows`` (duplicates included), overall
    and per batch-size decile, with the leave-one-out MAPE where ``loo_prediction`` (one per
    distinct key, in the order of ``rows``) is given."""
    batch = np.array([r.batch_size for r in rows for _ in r.measured_ms], float)
    context = np.array([r.kv_cache_size for r in rows for _ in r.measured_ms], float)
    measured = np.array([t for r in rows for t in r.measured_ms], float)
    predicted = decode_table_predict(table, batch, context)
    loo = None
    if loo_prediction is not None:
        loo = np.array([p for r, p in zip(rows, loo_prediction, strict=True) for _ in r.measured_ms])
    out: dict = {"mape": mape_percent(predicted, measured), "rows": len(measured)}
    out["leave_one_out"] = None if loo is None else mape_percent(loo, measured)
    deciles = []
    for lo, hi in batch_deciles(np.array([r.batch_size for r in rows], float)):
        mask = (batch >= lo) & (batch <= hi)
        if not mask.any():
            continue
        deciles.append({
            "batch_size": [lo, hi],
            "rows": int(mask.sum()),
            "mape": mape_percent(predicted[mask], measured[mask]),
            "leave_one_out": None if loo is None else mape_percent(loo[mask], measured[mask]),
        })
    out["by_batch_decile"] = deciles
    return out


def exact_decode_leave_one_out(rows: list[AttentionRow]) -> np.ndarray:
    """Leave-one-out predictions by refitting the table without each distinct key (slow:
    one constrained fit per key); for checking the PRESS values of :func:`fit_decode_table`."""
    predictions = []
    for i, row in enumerate(rows):
        table = fit_decode_table(rows[:i] + rows[i + 1:])["table"]
        predictions.append(float(decode_table_predict(table, np.array([row.batch_size], float),
                                                      np.array([row.kv_cache_size], float))[0]))
    return np.array(predictions)


def prefill_mape(rows: list[AttentionRow], e: np.ndarray) -> float:
    """MAPE (%) of per-layer prefill coefficients ``e`` on every profiling row of ``rows``."""
    _, chunk, prior, y = _rows_arrays(rows, every_row=True)
    return mape_percent(prefill_design(chunk, prior) @ e, y)


def fit_reference_attention(rows: list[AttentionRow]) -> dict:
    """Fit decode and prefill attention (ms per layer) on the TP1 Llama-2-7B A100 keys.

    Decode: the monotone table of :func:`fit_decode_table`. Prefill: least squares on
    relative error over the distinct keys. MAPE on every profiling row.
    """
    decode = [r for r in rows if r.tensor_parallel == 1 and not r.is_prefill]
    prefill = [r for r in rows if r.tensor_parallel == 1 and r.is_prefill]
    decode_fit = fit_decode_table(decode)
    _, chunk, prior, y = _rows_arrays(prefill)
    e = relative_least_squares(prefill_design(chunk, prior), y)
    decode_errors_ = decode_errors(decode, decode_fit["table"], decode_fit["loo_prediction"])
    return {
        "decode": {
            "batch_size_knots": list(DECODE_BATCH_KNOTS),
            "context_knots": list(DECODE_CONTEXT_KNOTS),
            "ms": decode_fit["table"].tolist(),
        },
        "prefill": {
            "intercept": e[0],
            "per_chunk_token": e[1],
            "per_chunk_prior_token_pair": e[2],
            "per_chunk_causal_pair": e[3],
            "per_prior_token": e[4],
            "max_profiled_chunk_tokens": int(chunk.max()),
        },
        "_decode_errors": decode_errors_,
        "_mape": {
            "decode_attention": decode_errors_["mape"],
            "decode_attention_leave_one_out": decode_errors_["leave_one_out"],
            "prefill_attention": prefill_mape(prefill, e),
        },
        "_rows": {
            "decode": len(decode),
            "prefill": len(prefill),
            "decode_measurements": sum(len(r.measured_ms) for r in decode),
            "prefill_measurements": sum(len(r.measured_ms) for r in prefill),
        },
    }


def scaling_factors(spec: ModelSpec, gpu: GPUSpec, tensor_parallel: int) -> dict[str, float]:
    """Multipliers that carry the reference attention fit to another model, GPU or TP degree.

    * ``kv_read``: decode per-context-token term and prefill per-prior-token term are memory
      bound: KV bytes per token on one GPU (kv_heads_per_gpu * head_dim) and HBM bandwidth.
    * ``decode_per_request``: per-request decode work (query/output rows, block tables) is
      memory bound and grows with the query heads on one GPU.
    * ``prefill_flops``: prefill attention is compute bound: query heads per GPU * head_dim
      (the attention FLOPs per token pair) and dense BF16 peak.
    Intercepts (kernel launches) are kept.
    """
    ref_model, ref_gpu = MODELS[REFERENCE[0]], GPUS[REFERENCE[1]]
    ref_q = ref_model.num_q_heads * ref_model.head_dim
    ref_kv = ref_model.num_kv_heads * ref_model.head_dim
    q_per_gpu = spec.num_q_heads / tensor_parallel * spec.head_dim
    kv_per_gpu = max(1, spec.num_kv_heads // tensor_parallel) * spec.head_dim
    bandwidth = ref_gpu.memory_bandwidth / gpu.memory_bandwidth
    flops = ref_gpu.peak_flops / gpu.peak_flops
    return {
        "kv_read": kv_per_gpu / ref_kv * bandwidth,
        "decode_per_request": q_per_gpu / ref_q * bandwidth,
        "prefill_flops": q_per_gpu / ref_q * flops,
    }


def scale_attention(reference: dict, factors: dict[str, float]) -> tuple[dict, dict]:
    """The reference attention coefficients carried to another model/GPU/TP by ``factors``.

    Decode table ``T[i, j]`` (batch knot i, context knot j) is split into the launch
    ``T[0, 0]`` (kept), the per-request part ``T[i, 0] - T[0, 0]`` (x ``decode_per_request``)
    and the context part ``T[i, j] - T[i, 0]`` (x ``kv_read``). Positive factors keep the
    table non-decreasing in both directions with context slopes growing with the batch.
    """
    dec, pre = reference["decode"], reference["prefill"]
    table = np.array(dec["ms"], float)
    launch, no_context = table[0, 0], table[:, :1]
    scaled = launch + factors["decode_per_request"] * (no_context - launch) + factors["kv_read"] * (table - no_context)
    decode = {"batch_size_knots": dec["batch_size_knots"], "context_knots": dec["context_knots"], "ms": scaled.tolist()}
    prefill = {
        "intercept": pre["intercept"],
        "per_chunk_token": pre["per_chunk_token"] * factors["prefill_flops"],
        "per_chunk_prior_token_pair": pre["per_chunk_prior_token_pair"] * factors["prefill_flops"],
        "per_chunk_causal_pair": pre["per_chunk_causal_pair"] * factors["prefill_flops"],
        "per_prior_token": pre["per_prior_token"] * factors["kv_read"],
        "max_profiled_chunk_tokens": pre["max_profiled_chunk_tokens"],
    }
    return decode, prefill


def attention_validation(rows: list[AttentionRow], tensor_parallel: int, decode: dict, prefill: dict) -> dict:
    """MAPE (%) of scaled coefficients on the sampled rows measured at this TP degree, if any."""
    out: dict[str, float | int | None] = {}
    dec = [r for r in rows if r.tensor_parallel == tensor_parallel and not r.is_prefill]
    pre = [r for r in rows if r.tensor_parallel == tensor_parallel and r.is_prefill]
    e = np.array([prefill[k] for k in (
        "intercept", "per_chunk_token", "per_chunk_prior_token_pair", "per_chunk_causal_pair", "per_prior_token")])
    if dec:
        out["decode_attention"] = decode_errors(dec, np.array(decode["ms"]))["mape"]
    if pre:
        out["prefill_attention"] = prefill_mape(pre, e)
    out["decode_rows"] = sum(len(r.measured_ms) for r in dec)
    out["prefill_rows"] = sum(len(r.measured_ms) for r in pre)
    return out


def tp_scaling_validation(data: VidurData) -> dict[int, dict]:
    """For every TP degree > 1 in the reference attention profile: MAPE of the heads-per-GPU
    scaled TP1 fit on the sampled rows at that degree (evidence for the TP scaling rule)."""
    reference = data.reference_attention
    spec, gpu = MODELS[REFERENCE[0]], GPUS[REFERENCE[1]]
    degrees = sorted({r.tensor_parallel for r in data.attention} - {1})
    out = {}
    for tp in degrees:
        decode, prefill = scale_attention(reference, scaling_factors(spec, gpu, tp))
        out[tp] = attention_validation(data.attention, tp, decode, prefill)
    return out


# --------------------------------------------------------------------------- assembly


def fit_combination(data: VidurData, model: str, gpu: str, tensor_parallel: int, fit_date: str | None = None) -> dict:
    """The full JSON document for one combination (what the package ships)."""
    spec, gpu_spec = MODELS[model], GPUS[gpu]
    mlp_rows = data.mlp(model, gpu)
    check_shape(mlp_rows, spec, data.mlp_path(model, gpu))
    non_attn = fit_non_attention(mlp_rows, spec, tensor_parallel)
    grid = np.array(non_attn["num_tokens"])
    mape: dict[str, float | None] = dict(non_attn.pop("_mape"))
    files = [
        str(data.mlp_path(model, gpu).relative_to(data.data_dir)),
        *(f"{ATTENTION_DIR}/{name}" for name in ATTENTION_FILES),
    ]

    if tensor_parallel > 1:
        comm = fit_all_reduce(data.all_reduce(gpu), tensor_parallel, spec, grid)
        mape.update(comm.pop("_mape"))
        comm["node"] = NETWORK_NODES[gpu]
        files.append(str(data.network_path(gpu).relative_to(data.data_dir)))
    else:
        comm = None
        mape["all_reduce"] = mape["all_reduce_leave_one_out"] = None

    reference = data.reference_attention
    factors = scaling_factors(spec, gpu_spec, tensor_parallel)
    decode, prefill = scale_attention(reference, factors)
    is_reference = (model, gpu, tensor_parallel) == REFERENCE
    validation = attention_validation(data.attention, tensor_parallel, decode, prefill)
    if is_reference:
        mape.update(reference["_mape"])
        rows = reference["_rows"]
        attention_note = (
            f"fitted on {rows['decode']} decode and {rows['prefill']} prefill distinct TP1 keys; "
            f"MAPE on all {rows['decode_measurements']} decode and "
            f"{rows['prefill_measurements']} prefill profiling rows"
        )
    elif model == REFERENCE[0] and gpu == REFERENCE[1] and (validation["decode_rows"] or validation["prefill_rows"]):
        mape["decode_attention"] = validation.get("decode_attention")
        mape["prefill_attention"] = validation.get("prefill_attention")
        attention_note = (
            f"scaled from the TP1 fit; MAPE is a validation on the {validation['decode_rows']} "
            f"decode and {validation['prefill_rows']} prefill sampled TP{tensor_parallel} rows"
        )
    else:
        mape["decode_attention"] = None
        mape["prefill_attention"] = None
        attention_note = "scaled from the reference fit; no attention measurements to compare with"
    mape.setdefault("decode_attention_leave_one_out", None)
    mape["reference_decode_attention"] = reference["_mape"]["decode_attention"]
    mape["reference_decode_attention_leave_one_out"] = reference["_mape"]["decode_attention_leave_one_out"]
    mape["reference_prefill_attention"] = reference["_mape"]["prefill_attention"]

    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "gpu": gpu,
        "tensor_parallel": tensor_parallel,
        "num_layers": spec.num_layers,
        "units": (
            "Milliseconds as in the Vidur CSVs, on the num_tokens grid (tokens). "
            "non_attention.per_layer_ops_ms: ms per transformer layer of each mlp.csv op "
            "(iteration total = num_layers * their sum + once_per_iteration_ops_ms); "
            "lm_head.ms: per iteration, looked up at one row per scheduled request; "
            "tp_all_reduce.per_iteration_ms: all all-reduces of one iteration; "
            "*_attention_per_layer_ms: per layer; decode_attention_per_layer_ms.ms[i][j] at "
            "batch_size_knots[i] decode requests of mean context context_knots[j] tokens, "
            "bilinear between knots, each last segment extended linearly; "
            "slopes in ms per token (or row) past the grid; cpu_overhead in seconds."
        ),
        "non_attention": non_attn,
        "tp_all_reduce": comm,
        "decode_attention_per_layer_ms": decode,
        "prefill_attention_per_layer_ms": prefill,
        "decode_attention_fit": {
            "of": "{}/{}/tp{} (the reference; other combinations scale it)".format(*REFERENCE),
            "rows": reference["_decode_errors"]["rows"],
            "mape": reference["_decode_errors"]["mape"],
            "leave_one_out": reference["_decode_errors"]["leave_one_out"],
            "leave_one_out_method": (
                "PRESS residuals of the constrained least squares with the binding constraints "
                "held fixed (exact refits: fit_latency_model.py --check --exact-loo)"
            ),
            "by_batch_decile": reference["_decode_errors"]["by_batch_decile"],
        },
        "cpu_overhead": {
            "per_iteration_s": CPU_OVERHEAD_PER_ITERATION_S,
            "per_request_s": CPU_OVERHEAD_PER_REQUEST_S,
            "assumption": (
                "Not in these CSVs. Rounded from a line through Vidur's CPU profile of "
                "Llama-2-7B TP1 on A100 (data/profiling/a100/cpu_overheads.csv: schedule + "
                "sampler + prepare-inputs medians, batch 8-64, 1.04 ms + 37.6 us/request); "
                "output processing excluded (overlapped by vLLM >= 0.6). Same for every GPU/TP."
            ),
        },
        "scaling": {
            "attention_reference": "{}/{}/tp{}".format(*REFERENCE),
            "is_reference": is_reference,
            "factors": factors,
            "attention_note": attention_note,
            "rules": [
                "decode table: context part T[i,j]-T[i,0] and prefill per-prior-token term x (kv_heads_per_gpu*head_dim)/(32*128) x (2.039 TB/s / HBM bandwidth)",
                "decode table: per-request part T[i,0]-T[0,0] x (q_heads_per_gpu*head_dim)/(32*128) x (2.039 TB/s / HBM bandwidth)",
                "prefill per-token and token-pair (FLOP) terms x (q_heads_per_gpu*head_dim)/(32*128) x (312 TFLOP/s / peak BF16)",
                "decode table launch T[0,0] and prefill intercept (kernel launch) unchanged",
                "non-attention ops and all-reduce measured for this exact model/GPU/TP (no scaling)",
            ],
        },
        "mape_percent": mape,
        "provenance": {
            "source": f"{VIDUR_REPOSITORY} data/ (MIT licence), commit {VIDUR_COMMIT}",
            "vidur_commit": VIDUR_COMMIT,
            "files": files,
            "statistic": "time_stats.<op>.median",
            "fit_script": "scripts/fit_latency_model.py",
            "fit_date": fit_date or dt.date.today().isoformat(),
            **({"profiles_reused": PROFILES_REUSED[model]} if model in PROFILES_REUSED else {}),
        },
    }


def coefficient_path(out_dir: Path, model: str, gpu: str, tensor_parallel: int) -> Path:
    return Path(out_dir) / f"{model}__{gpu}__tp{tensor_parallel}.json"


def strip_volatile(document: dict) -> dict:
    """The document without fields that legitimately change between refits (the date)."""
    out = json.loads(json.dumps(document))
    out["provenance"].pop("fit_date", None)
    return out


#: (mape_percent key, column label) of the per-operation error table, in execution order.
MAPE_COLUMNS = (
    ("emb", "emb"),
    ("input_layernorm", "in norm"),
    ("attn_pre_proj", "QKV"),
    ("attn_rope", "rope"),
    ("attn_post_proj", "out proj"),
    ("post_attention_layernorm", "post norm"),
    ("mlp_up_proj", "up"),
    ("mlp_act", "act"),
    ("mlp_down_proj", "down"),
    ("add", "add"),
    ("non_attention", "non-attn total"),
    ("all_reduce", "all-reduce"),
    ("decode_attention", "decode attn"),
    ("prefill_attention", "prefill attn"),
)


def _cell(mape: dict, key: str) -> str:
    """``"MAPE / leave-one-out"`` (%) when both exist, else the MAPE, else ``n/a``."""
    value, loo = mape.get(key), mape.get(f"{key}_leave_one_out")
    if value is None:
        return "n/a"
    return f"{value:.1f}" if loo is None else f"{value:.1f} / {loo:.1f}"


def mape_table(documents: list[dict]) -> str:
    """Markdown table of MAPE (%) per operation (columns) per combination (rows); table cells
    read ``MAPE / leave-one-out MAPE``."""
    header = "| combination | " + " | ".join(label for _, label in MAPE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(MAPE_COLUMNS) + 1)]
    for doc in documents:
        cells = [_cell(doc["mape_percent"], key) for key, _ in MAPE_COLUMNS]
        name = f"{doc['model']} / {doc['gpu']} / TP{doc['tensor_parallel']}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def operation_table(document: dict) -> str:
    """Markdown table of one combination's errors: one row per operation, MAPE and LOO (%)."""
    mape = document["mape_percent"]
    lines = ["| operation | MAPE | leave-one-out |", "|---|---|---|"]
    for key, _ in MAPE_COLUMNS:
        value, loo = mape.get(key), mape.get(f"{key}_leave_one_out")
        cells = ["n/a" if v is None else f"{v:.2f}" for v in (value, loo)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decile_table(fit: dict, exact_loo: dict | None = None) -> str:
    """Markdown table of the reference decode-attention errors per batch-size decile (%)."""
    header = "| batch size | rows | MAPE | leave-one-out |" + (" exact leave-one-out |" if exact_loo else "")
    lines = [header, "|---|---|---|---|" + ("---|" if exact_loo else "")]
    exact = exact_loo["by_batch_decile"] if exact_loo else [None] * len(fit["by_batch_decile"])
    for decile, refit in zip(fit["by_batch_decile"], exact, strict=True):
        lo, hi = decile["batch_size"]
        cells = [f"{lo}-{hi}", str(decile["rows"]), f"{decile['mape']:.2f}", f"{decile['leave_one_out']:.2f}"]
        if refit:
            cells.append(f"{refit['leave_one_out']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    total = ["all", str(fit["rows"]), f"{fit['mape']:.2f}", f"{fit['leave_one_out']:.2f}"]
    if exact_loo:
        total.append(f"{exact_loo['leave_one_out']:.2f}")
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines)


def dumps(document: dict, indent: int = 1) -> str:
    """JSON with one key per line and lists of numbers kept on one line (readable diffs)."""

    def render(value: object, depth: int) -> str:
        pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
        if isinstance(value, dict):
            if not value:
                return "{}"
            items = [f"{inner}{json.dumps(k)}: {render(v, depth + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            items = [f"{inner}{render(v, depth + 1)}" for v in value]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(value)

    return render(document, 0) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--check", action="store_true", help="report per-op MAPE only; write nothing")
    parser.add_argument("--exact-loo", action="store_true",
                        help="also refit the decode table without each key (about a minute)")
    args = parser.parse_args(argv)

    data = VidurData(args.data_dir)
    documents = [fit_combination(data, *combo) for combo in SHIPPED]
    print("Per-operation fit error on the profiling rows, % (MAPE / leave-one-out MAPE):")
    print(mape_table(documents))
    reference = documents[SHIPPED.index(REFERENCE)]
    print("\n{}/{}/TP{} per operation, %:".format(*REFERENCE))
    print(operation_table(reference))
    exact = None
    if args.exact_loo:
        decode_rows = [r for r in data.attention if r.tensor_parallel == 1 and not r.is_prefill]
        table = np.array(reference["decode_attention_per_layer_ms"]["ms"])
        exact = decode_errors(decode_rows, table, exact_decode_leave_one_out(decode_rows))
    print("\nDecode attention (reference fit) by batch-size decile, %:")
    print(decile_table(reference["decode_attention_fit"], exact))
    for tp, result in tp_scaling_validation(data).items():
        cells = ", ".join(
            f"{kind} {result[kind]:.1f}% on {result[kind.split('_')[0] + '_rows']} rows"
            for kind in ("decode_attention", "prefill_attention")
            if kind in result
        )
        print(f"Llama-2-7B/A100 attention scaled TP1 -> TP{tp}: {cells}")
    if args.check:
        stale = []
        for doc in documents:
            path = coefficient_path(args.out_dir, doc["model"], doc["gpu"], doc["tensor_parallel"])
            if not path.exists() or strip_volatile(json.loads(path.read_text())) != strip_volatile(doc):
                stale.append(path.name)
        print("shipped coefficients match a fresh fit" if not stale else f"differ from a fresh fit: {stale}")
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for doc in documents:
        path = coefficient_path(args.out_dir, doc["model"], doc["gpu"], doc["tensor_parallel"])
        path.write_text(dumps(doc))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
