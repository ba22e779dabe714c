"""Per-iteration latency of one vLLM-style replica, calibrated on Vidur's GPU profiles.

An engine iteration runs ``decode_batch`` = B decode requests (one new token each, mean
context length L = C / B tokens, C = their context tokens summed) and any number of prefill
chunks. It is built the way Vidur measures it. Its duration in **seconds** is the sum of

* **non-attention ops** ``N(tokens)``, from ``profiling/compute/<gpu>/<model>/mlp.csv``
  (measured for every shipped model, GPU and TP degree): ``num_layers`` times the sum of the
  per-layer operation tables (``input_layernorm``, ``attn_pre_proj`` = QKV projection,
  ``attn_rope``, ``attn_post_proj`` = output projection, ``post_attention_layernorm``,
  ``mlp_up_proj``, ``mlp_act``, ``mlp_down_proj``, ``add``), plus the embedding and the final
  norm once. Each table holds one operation's median time per layer (ms) at the profiled
  num_tokens, made non-decreasing; it is looked up at ``tokens`` = all tokens of the iteration
  (prefill chunk tokens + B), piecewise-linear between grid points and linear past the last;
* **tensor-parallel all-reduces** ``A(tokens)`` (TP > 1), from
  ``profiling/network/<gpu>_dgx/all_reduce.csv``: ``2 * num_layers + 1`` all-reduces of
  ``tokens * hidden * 2`` bytes (single-node NCCL);
* **LM head** ``H(rows)``: not profiled; the ``mlp_up_proj`` table scaled by
  ``vocab / up_proj width``, evaluated at one logit row per scheduled request (decode requests
  + prefill chunks; counting non-final chunks makes this a slight upper bound);
* **decode attention** (if B >= 1), from the attention profile (``attention_rows_tp1.csv``,
  ``attention_sampled.csv``), per layer a table ``T(B, L)`` over batch-size knots x mean-context
  knots, bilinear in between, non-decreasing in both and with context slopes growing with B;
  each last segment is extended linearly (past 128 requests, past 4,096 context tokens). For a
  fixed B it is piecewise-linear in the total context C: on the segment of mean context
  ``[l_s, l_s+1)`` it is ``a_s(B) + b_s(B) * C``;
* **prefill attention**, from the same attention profile, per layer ``e0`` once plus, per chunk
  of ``c`` tokens after ``p`` prior tokens, ``e1*c + e2*c*p + e3*c*c/2 + e4*p`` (FLOP terms
  for the chunk against its prior context and against itself under the causal mask, and a
  KV-read term); a chunk longer than the longest profiled one (4,096 tokens) is costed as
  consecutive profiled-size sub-chunks, each after the ones before it;
* **CPU overhead** ``o0 + o1 * (B + number of chunks)``: scheduling, input preparation and
  sampling (an assumption derived from Vidur's CPU profile, not in the shared data;
  ``overhead_s`` replaces it by a constant).

So a pure-decode iteration takes ``base + beta * C`` seconds with ``(base, beta)`` constant while
the mean context stays in one segment: :meth:`IterationTimeModel.decode_segment` returns them and
the segment's end, which is what the simulator's closed-form decode stretches need.
``decode_context_granularity`` (Vidur's predictor: 256) instead evaluates decode attention at
the mean context rounded up the way Vidur does, a step function of C.

Scaling (see ``docs/latency_calibration.md``): attention kernels were profiled only for
Llama-2-7B on A100 (FlashAttention backend). For another model, GPU or TP degree the fitted
terms are multiplied by: the decode table's context part ``T(B, L) - T(B, 0)`` and ``e4``
(memory bound) the KV bytes per token on one GPU (``kv_heads_per_gpu * head_dim``, so
Llama-3-8B's 8 GQA KV heads read 4x less than 32) and the HBM-bandwidth ratio; its per-request
part ``T(B, 0) - T(1, 0)`` the query heads per GPU and the bandwidth ratio; ``e1..e3`` (compute
bound) the query heads per GPU * head_dim and the peak-BF16 ratio; the launch ``T(1, 0)`` and
``e0`` are kept. Non-attention ops and all-reduce times are measured for each shipped combination. Every
coefficient file records its scaling factors, per-operation fit errors and provenance (Vidur
commit, files, fit date).

Coefficients are refitted by ``scripts/fit_latency_model.py`` (the only code that reads the
raw CSVs); this module needs only the shipped JSON files.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COEFFICIENTS_DIR = Path(__file__).resolve().parent / "coefficients"

#: Batch sizes / token counts held in precomputed per-integer tables (beyond: interpolation on
#: the profiled grid, then linear extrapolation, computed on demand).
DENSE_TABLE_SIZE = 4096

#: Version of the JSON layout written by scripts/fit_latency_model.py (3: decode attention
#: as a table over batch size x mean context; prefill records its longest profiled chunk).
SCHEMA_VERSION = 3

#: Vidur's predictor (``kv_cache_prediction_granularity``, vidur 0.0.26) rounds the mean decode
#: context up to a multiple of this many tokens (``decode_context_granularity`` reproduces it;
#: no batching policy uses it by default, see docs/latency_calibration.md).
VIDUR_DECODE_CONTEXT_GRANULARITY = 256

_MS = 1e-3


def _file_name(model: str, gpu: str, tensor_parallel: int) -> str:
    return f"{model}__{gpu}__tp{tensor_parallel}.json"


@dataclass(frozen=True)
class OpTable:
    """One operation's time (ms) at each point of the ``num_tokens`` grid, non-decreasing,
    and the slope (ms per token, or per row for the LM head) used past the last point."""

    name: str
    ms: tuple[float, ...]
    slope_ms: float

    @classmethod
    def from_dict(
        cls, name: str, entry: Mapping[str, Any], slope_key: str = "extrapolation_slope_ms_per_token"
    ) -> OpTable:
        return cls(name, tuple(map(float, entry["ms"])), float(entry[slope_key]))


@dataclass(frozen=True)
class DecodeAttention:
    """Decode attention per layer (ms) of B decode requests of mean context length L tokens.

    ``ms[i][j]`` is the time at ``batch_size_knots[i]`` requests and ``context_knots[j]``
    tokens; bilinear in between, and each last segment is extended linearly past the last
    knot (more requests, longer contexts).
    """

    batch_size_knots: tuple[int, ...]
    context_knots: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> DecodeAttention:
        batch = tuple(int(b) for b in entry["batch_size_knots"])
        context = tuple(int(c) for c in entry["context_knots"])
        ms = tuple(tuple(float(v) for v in row) for row in entry["ms"])
        if len(batch) < 2 or len(context) < 2:
            raise ValueError("decode attention table needs at least two knots in each direction")
        if any(b1 <= b0 for b0, b1 in zip(batch, batch[1:])) or any(c1 <= c0 for c0, c1 in zip(context, context[1:])):
            raise ValueError("decode attention knots must increase")
        if len(ms) != len(batch) or any(len(row) != len(context) for row in ms):
            raise ValueError("decode attention table does not match its knots")
        return cls(batch, context, ms)

    def at_batch(self, batch_size: float) -> list[float]:
        """Milliseconds per layer at every context knot for ``batch_size`` requests: linear
        between batch knots, extended with the last segment's slope past the last one."""
        knots = self.batch_size_knots
        i = min(max(bisect_right(knots, batch_size) - 1, 0), len(knots) - 2)
        w = (batch_size - knots[i]) / (knots[i + 1] - knots[i])
        return [lo + w * (hi - lo) for lo, hi in zip(self.ms[i], self.ms[i + 1], strict=True)]

    def per_layer_ms(self, batch_size: float, mean_context: float) -> float:
        """Milliseconds per layer for ``batch_size`` requests of ``mean_context`` tokens."""
        values, knots = self.at_batch(batch_size), self.context_knots
        j = min(max(bisect_right(knots, mean_context) - 1, 0), len(knots) - 2)
        slope = (values[j + 1] - values[j]) / (knots[j + 1] - knots[j])
        return values[j] + slope * (mean_context - knots[j])


@dataclass(frozen=True)
class PrefillAttention:
    """Prefill attention per layer (ms): ``intercept`` once per iteration plus, per chunk,
    ``per_chunk_token*c + per_chunk_prior_token_pair*c*p + per_chunk_causal_pair*c*c/2
    + per_prior_token*p`` for a chunk of ``c`` tokens after ``p`` prior tokens; a chunk longer
    than ``max_profiled_chunk_tokens`` is costed as consecutive sub-chunks of that size."""

    intercept: float
    per_chunk_token: float
    per_chunk_prior_token_pair: float
    per_chunk_causal_pair: float
    per_prior_token: float
    max_profiled_chunk_tokens: int


@dataclass(frozen=True)
class LatencyCoefficients:
    """Fitted coefficients of one (model, GPU, TP) combination, as stored in its JSON file.

    Tables are in milliseconds on the ``num_tokens`` grid: ``per_layer_ops`` per transformer
    layer, ``once_per_iteration_ops``, ``all_reduce`` (None at TP1) and ``lm_head`` per
    iteration. Attention coefficients are per layer in milliseconds; CPU overhead in seconds.
    """

    model: str
    gpu: str
    tensor_parallel: int
    num_layers: int
    num_tokens: tuple[int, ...]
    per_layer_ops: tuple[OpTable, ...]
    once_per_iteration_ops: tuple[OpTable, ...]
    all_reduce: OpTable | None
    lm_head: OpTable
    decode: DecodeAttention
    prefill: PrefillAttention
    cpu_overhead_s: float
    cpu_overhead_per_request_s: float
    mape_percent: Mapping[str, float | None] = field(default_factory=dict, compare=False)  # treat as read-only (a plain dict, so models pickle)
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False)  # treat as read-only (a plain dict, so models pickle)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LatencyCoefficients:
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported coefficient schema {doc.get('schema_version')!r}")
        non_attn = doc["non_attention"]
        comm = doc.get("tp_all_reduce")
        all_reduce = None
        if comm is not None:  # per iteration on the same grid (TP > 1 only)
            ms = tuple(map(float, comm["per_iteration_ms"]))
            all_reduce = OpTable("all_reduce", ms, float(comm["extrapolation_slope_ms_per_token"]))
        coefficients = cls(
            model=doc["model"],
            gpu=doc["gpu"],
            tensor_parallel=int(doc["tensor_parallel"]),
            num_layers=int(doc["num_layers"]),
            num_tokens=tuple(int(n) for n in non_attn["num_tokens"]),
            per_layer_ops=tuple(OpTable.from_dict(k, v) for k, v in non_attn["per_layer_ops_ms"].items()),
            once_per_iteration_ops=tuple(
                OpTable.from_dict(k, v) for k, v in non_attn["once_per_iteration_ops_ms"].items()
            ),
            all_reduce=all_reduce,
            lm_head=OpTable.from_dict("lm_head", non_attn["lm_head"], "extrapolation_slope_ms_per_row"),
            decode=DecodeAttention.from_dict(doc["decode_attention_per_layer_ms"]),
            prefill=PrefillAttention(**doc["prefill_attention_per_layer_ms"]),
            cpu_overhead_s=float(doc["cpu_overhead"]["per_iteration_s"]),
            cpu_overhead_per_request_s=float(doc["cpu_overhead"]["per_request_s"]),
            mape_percent=dict(doc.get("mape_percent", {})),
            provenance=dict(doc.get("provenance", {})),
        )
        tables = (*coefficients.per_layer_ops, *coefficients.once_per_iteration_ops, coefficients.lm_head)
        for table in (*tables, coefficients.all_reduce):
            if table is not None and len(table.ms) != len(coefficients.num_tokens):
                raise ValueError(f"table {table.name!r} does not match the num_tokens grid")
        return coefficients

    @classmethod
    def load(cls, path: Path) -> LatencyCoefficients:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def token_table(self) -> OpTable:
        """Per-iteration time (ms) of everything looked up from the iteration's total tokens:
        ``num_layers * sum(per-layer op tables) + sum(once-per-iteration op tables)``
        (``mlp.csv``) ``+ all-reduce table`` (network profile, TP > 1); slopes add alike."""
        layers = self.num_layers
        columns = [[layers * v for v in op.ms] for op in self.per_layer_ops]
        columns += [list(op.ms) for op in self.once_per_iteration_ops]
        slope = layers * sum(op.slope_ms for op in self.per_layer_ops)
        slope += sum(op.slope_ms for op in self.once_per_iteration_ops)
        if self.all_reduce is not None:
            columns.append(list(self.all_reduce.ms))
            slope += self.all_reduce.slope_ms
        return OpTable("tokens", tuple(math.fsum(values) for values in zip(*columns, strict=True)), slope)


class _Table:
    """Piecewise-linear function of an integer count, in seconds: dense list + grid fallback."""

    __slots__ = ("dense", "grid", "values", "slope")

    def __init__(self, grid: Sequence[int], values_ms: Sequence[float], slope_ms: float) -> None:
        self.grid = list(grid)
        self.values = [v * _MS for v in values_ms]
        self.slope = slope_ms * _MS
        self.dense = [self.evaluate(n) for n in range(DENSE_TABLE_SIZE + 1)]

    def evaluate(self, n: int) -> float:
        grid, values = self.grid, self.values
        if n <= grid[0]:
            return values[0]
        if n >= grid[-1]:
            return values[-1] + self.slope * (n - grid[-1])
        i = bisect_right(grid, n)
        x0, x1 = grid[i - 1], grid[i]
        return values[i - 1] + (values[i] - values[i - 1]) * (n - x0) / (x1 - x0)

    def __call__(self, n: int) -> float:
        return self.dense[n] if n <= DENSE_TABLE_SIZE else self.evaluate(n)


class IterationTimeModel:
    """Seconds per engine iteration of one replica from its batch composition.

    Build with :meth:`for_replica`. All inputs are token or request counts; all outputs are
    seconds. See the module docstring for the model and its assumptions.

    :param coefficients: one combination's fitted coefficients.
    :param overhead_s: replaces the assumed CPU overhead (constant + per request) by this
        constant number of seconds per iteration.
    :param decode_context_granularity: if set (tokens), decode attention is evaluated the way
        Vidur's predictor does it: at the mean decode context ``floor(C / B) + 1`` (Vidur counts
        the new token) rounded up to a multiple of this (Vidur's default: 256), a step
        function of C. ``None``: at the exact mean context ``C / B``.
    """

    __slots__ = (
        "coefficients",
        "decode_context_granularity",
        "_tokens",
        "_lm_head",
        "_overhead",
        "_overhead_per_request",
        "_layers_s",
        "_context_knots",
        "_context_breaks",
        "_last_segment",
        "_segment_base",
        "_segment_beta",
        "_segment_attention",
        "_granular",
        "_prefill0",
        "_prefill_token",
        "_prefill_pair",
        "_prefill_causal",
        "_prefill_prior",
        "_max_chunk",
    )

    def __init__(self, coefficients: LatencyCoefficients, overhead_s: float | None = None,
                 decode_context_granularity: int | None = None) -> None:
        c = coefficients
        self.coefficients = c
        layers_s = c.num_layers * _MS  # per-layer ms -> per-iteration s
        self._layers_s = layers_s
        tokens = c.token_table()
        self._tokens = _Table(c.num_tokens, tokens.ms, tokens.slope_ms)
        self._lm_head = _Table(c.num_tokens, c.lm_head.ms, c.lm_head.slope_ms)
        if overhead_s is None:
            self._overhead = c.cpu_overhead_s
            self._overhead_per_request = c.cpu_overhead_per_request_s
        else:
            if not (overhead_s >= 0.0 and math.isfinite(overhead_s)):
                raise ValueError(f"overhead_s must be a finite non-negative number, got {overhead_s!r}")
            self._overhead = float(overhead_s)
            self._overhead_per_request = 0.0
        if decode_context_granularity is not None and not (
            isinstance(decode_context_granularity, int) and decode_context_granularity >= 1
        ):
            raise ValueError(
                f"decode_context_granularity must be a positive integer or None, got {decode_context_granularity!r}")
        self.decode_context_granularity = decode_context_granularity
        knots = c.decode.context_knots
        self._context_knots = knots
        self._context_breaks = knots[1:-1]
        self._last_segment = len(knots) - 2
        self._segment_base, self._segment_beta, self._segment_attention = self._dense_segments()
        self._granular: dict[tuple[int, int], float] = {}
        self._prefill0 = c.prefill.intercept * layers_s
        self._prefill_token = c.prefill.per_chunk_token * layers_s
        self._prefill_pair = c.prefill.per_chunk_prior_token_pair * layers_s
        self._prefill_causal = c.prefill.per_chunk_causal_pair * layers_s / 2.0
        self._prefill_prior = c.prefill.per_prior_token * layers_s
        self._max_chunk = c.prefill.max_profiled_chunk_tokens

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_replica(
        cls, model: str, gpu: str, tensor_parallel: int, overhead_s: float | None = None,
        decode_context_granularity: int | None = None,
    ) -> IterationTimeModel:
        """Load the shipped coefficients of (model, gpu, tensor_parallel).

        ``overhead_s`` and ``decode_context_granularity``: see the class. Raises
        ``ValueError`` naming the combination and listing the available ones when it is not
        shipped.
        """
        path = COEFFICIENTS_DIR / _file_name(model, gpu, tensor_parallel)
        if not path.is_file():
            options = ", ".join(f"({m!r}, {g!r}, {t})" for m, g, t in cls.available())
            raise ValueError(
                f"no latency coefficients for model={model!r}, gpu={gpu!r}, "
                f"tensor_parallel={tensor_parallel!r}; available (model, gpu, tp): {options}"
            )
        return cls(LatencyCoefficients.load(path), overhead_s=overhead_s,
                   decode_context_granularity=decode_context_granularity)

    @staticmethod
    def available() -> list[tuple[str, str, int]]:
        """Shipped (model, gpu, tensor_parallel) combinations, sorted."""
        combos = []
        for path in COEFFICIENTS_DIR.glob("*__*__tp*.json"):
            model, gpu, tp = path.stem.split("__")
            combos.append((model, gpu, int(tp[2:])))
        return sorted(combos)

    # ------------------------------------------------------------------ decode

    def _no_attention_decode_time(self, batch_size: int) -> float:
        """CPU overhead + token table at B tokens (mlp.csv ops, all-reduce) + LM head at B rows."""
        return (
            self._overhead
            + self._overhead_per_request * batch_size
            + self._tokens(batch_size)
            + self._lm_head(batch_size)
        )

    def _dense_segments(self) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
        """Per segment s, ``base_s(B)`` (s) and ``beta_s(B)`` (s per context token) for every
        B <= DENSE_TABLE_SIZE (index B; index 0 unused): :meth:`_segment_coefficients`,
        vectorised over B; and the decode-attention share of ``base_s(B)`` (s)."""
        decode, knots = self.coefficients.decode, np.array(self._context_knots, float)
        batch = np.arange(1, DENSE_TABLE_SIZE + 1, dtype=float)
        batch_knots, table = np.array(decode.batch_size_knots, float), np.array(decode.ms, float)
        i = np.clip(np.searchsorted(batch_knots, batch, side="right") - 1, 0, len(batch_knots) - 2)
        w = (batch - batch_knots[i]) / (batch_knots[i + 1] - batch_knots[i])
        values = table[i] + w[:, None] * (table[i + 1] - table[i])  # ms per layer at each context knot
        slope = np.diff(values, axis=1) / np.diff(knots)  # ms per layer per token of mean context
        other = np.array([self._no_attention_decode_time(b) for b in range(1, DENSE_TABLE_SIZE + 1)])
        attention = (values[:, :-1] - slope * knots[:-1]) * self._layers_s
        base = other[:, None] + attention
        beta = slope / batch[:, None] * self._layers_s
        return tuple([[math.nan, *column] for column in array.T.tolist()] for array in (base, beta, attention))

    def _segment_coefficients(self, batch_size: int) -> list[tuple[float, float]]:
        """``(base_s, beta_s)`` of every mean-context segment s for ``batch_size`` requests:
        on segment s (knots ``l_s <= C/B < l_s+1``; the last one unbounded) a pure-decode
        iteration takes ``base_s + beta_s * C`` seconds."""
        other = self._no_attention_decode_time(batch_size)
        values, knots, layers = self.coefficients.decode.at_batch(batch_size), self._context_knots, self._layers_s
        out = []
        for s in range(len(knots) - 1):
            slope = (values[s + 1] - values[s]) / (knots[s + 1] - knots[s])  # ms per layer per token of L
            out.append((other + (values[s] - slope * knots[s]) * layers, slope / batch_size * layers))
        return out

    def decode_segment(self, batch_size: int, context_tokens: int) -> tuple[float, float, int | None]:
        """``(base, beta, end)`` for ``batch_size`` = B decode requests whose contexts sum to
        ``context_tokens`` = C: a pure-decode iteration takes ``base + beta * C`` seconds for
        every total context in ``[C, end)`` (``end=None``: unbounded), B fixed. A decode stretch
        adds B to C per iteration, so it stays on this segment for ``ceil((end - C) / B)``
        iterations. :meth:`iteration_time` uses the same numbers, bit for bit.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        granularity = self.decode_context_granularity
        if granularity is not None:
            step = context_tokens // (batch_size * granularity)
            return self._granular_time(batch_size, step), 0.0, batch_size * granularity * (step + 1)
        s = bisect_right(self._context_breaks, context_tokens / batch_size)
        end = None if s == self._last_segment else batch_size * self._context_knots[s + 1]
        if batch_size <= DENSE_TABLE_SIZE:
            return self._segment_base[s][batch_size], self._segment_beta[s][batch_size], end
        base, beta = self._segment_coefficients(batch_size)[s]
        return base, beta, end

    def _granular_time(self, batch_size: int, step: int) -> float:
        """Pure-decode seconds with decode attention at Vidur's rounded mean context
        ``granularity * (step + 1)`` (memoised: few distinct steps occur)."""
        key = (batch_size, step)
        time = self._granular.get(key)
        if time is None:
            mean_context = self.decode_context_granularity * (step + 1)
            attention = self.coefficients.decode.per_layer_ms(batch_size, mean_context) * self._layers_s
            time = self._granular[key] = self._no_attention_decode_time(batch_size) + attention
        return time

    def decode_base_time(self, batch_size: int) -> float:
        """Seconds of a pure-decode iteration of ``batch_size`` = B (>= 1) requests at zero
        context: CPU overhead (assumed) + non-attention ops at B tokens (``num_layers`` x
        per-layer ``mlp.csv`` op tables + embedding and final norm) + all-reduces at B tokens
        (network profile, TP > 1) + LM head at B rows (scaled ``mlp_up_proj``) + decode
        attention at B requests and no context (attention profile)."""
        base, beta, _ = self.decode_segment(batch_size, 0)
        return base + beta * 0

    def decode_attention_time(self, batch_size: int, context_tokens: int) -> float:
        """Seconds of decode attention alone (all layers) for B requests with C context tokens."""
        if self.decode_context_granularity is not None:
            step = context_tokens // (batch_size * self.decode_context_granularity)
            return self._granular_time(batch_size, step) - self._no_attention_decode_time(batch_size)
        if batch_size <= DENSE_TABLE_SIZE:
            s = bisect_right(self._context_breaks, context_tokens / batch_size)
            return self._segment_attention[s][batch_size] + self._segment_beta[s][batch_size] * context_tokens
        return self.coefficients.decode.per_layer_ms(batch_size, context_tokens / batch_size) * self._layers_s

    # ------------------------------------------------------------------ timing

    def _prefill_chunk_time(self, chunk: int, context: int) -> float:
        """Prefill attention (s, all layers, without the per-iteration launch) of one chunk of
        ``chunk`` tokens after ``context`` prior tokens; past the longest profiled chunk as
        consecutive sub-chunks of that size, each after the ones before it."""
        token, pair, causal, prior = self._prefill_token, self._prefill_pair, self._prefill_causal, self._prefill_prior
        if chunk <= self._max_chunk:
            return chunk * (token + pair * context + causal * chunk) + prior * context
        time = 0.0
        while chunk > 0:
            part = min(chunk, self._max_chunk)
            time += part * (token + pair * context + causal * part) + prior * context
            chunk -= part
            context += part
        return time

    def iteration_time(
        self,
        decode_batch: int,
        decode_context_tokens: int,
        prefill_chunks: Sequence[tuple[int, int]] = (),
    ) -> float:
        """Seconds for one iteration: ``decode_batch`` = B decode requests whose context tokens
        sum to ``decode_context_tokens`` = C (mean context L = C / B), plus one prefill chunk per
        ``(chunk_tokens, prior_context_tokens)`` in ``prefill_chunks``.

        Terms and their sources, with T = B + all chunk tokens and R = B + number of chunks:
        non-attention ops at T tokens (``num_layers`` x the per-layer ``mlp.csv`` op tables +
        embedding and final norm), all-reduces at T tokens (network profile, TP > 1), LM head
        at R rows (scaled ``mlp_up_proj`` table), decode attention ``num_layers * T(B, L)`` if
        B >= 1 and prefill attention ``num_layers * (e0 + per-chunk terms)`` (attention
        profile), CPU overhead (assumed, or ``overhead_s``).

        Without prefill chunks this is exactly ``base + beta * C`` with ``(base, beta, _) =
        decode_segment(B, C)``.
        """
        if not prefill_chunks:
            if self.decode_context_granularity is None and 0 < decode_batch <= DENSE_TABLE_SIZE:
                s = bisect_right(self._context_breaks, decode_context_tokens / decode_batch)
                return self._segment_base[s][decode_batch] + self._segment_beta[s][decode_batch] * decode_context_tokens
            base, beta, _ = self.decode_segment(decode_batch, decode_context_tokens)
            return base + beta * decode_context_tokens
        chunk_tokens = 0
        per_chunk = 0.0
        token, pair, causal, prior = self._prefill_token, self._prefill_pair, self._prefill_causal, self._prefill_prior
        for chunk, context in prefill_chunks:
            chunk_tokens += chunk
            if chunk <= self._max_chunk:
                per_chunk += chunk * (token + pair * context + causal * chunk) + prior * context
            else:
                per_chunk += self._prefill_chunk_time(chunk, context)
        rows = decode_batch + len(prefill_chunks)
        time = (
            self._overhead
            + self._overhead_per_request * rows
            + self._tokens(decode_batch + chunk_tokens)
            + self._lm_head(rows)
            + self._prefill0
            + per_chunk
        )
        if decode_batch > 0:
            time += self.decode_attention_time(decode_batch, decode_context_tokens)
        return time

    def __repr__(self) -> str:
        c = self.coefficients
        return f"IterationTimeModel({c.model!r}, {c.gpu!r}, tensor_parallel={c.tensor_parallel})"
