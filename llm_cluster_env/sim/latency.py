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
  ``attention_sampled.csv``), per layer ``d0 + B * (d1 + d2 * L)`` = ``d0 + d1*B + d2*C``;
* **prefill attention**, from the same attention profile, per layer ``e0`` once plus, per chunk
  of ``c`` tokens after ``p`` prior tokens, ``e1*c + e2*c*p + e3*c*c/2 + e4*p`` (FLOP terms
  for the chunk against its prior context and against itself under the causal mask, and a
  KV-read term);
* **CPU overhead** ``o0 + o1 * (B + number of chunks)``: scheduling, input preparation and
  sampling (an assumption derived from Vidur's CPU profile, not in the shared data;
  ``overhead_s`` replaces it by a constant).

So a pure-decode iteration takes ``decode_base_time(B) + decode_time_per_context_token * C``
with ``decode_time_per_context_token = num_layers * d2`` (seconds per context token).

Scaling (see ``docs/latency_calibration.md``): attention kernels were profiled only for
Llama-2-7B on A100 (FlashAttention backend). For another model, GPU or TP degree the fitted
terms are multiplied by: ``d2`` and ``e4`` (memory bound) the KV bytes per token on one GPU
(``kv_heads_per_gpu * head_dim``, so Llama-3-8B's 8 GQA KV heads read 4x less than 32) and the
HBM-bandwidth ratio; ``d1`` the query heads per GPU and the bandwidth ratio; ``e1..e3`` (compute
bound) the query heads per GPU * head_dim and the peak-BF16 ratio; intercepts ``d0, e0`` are
kept. Non-attention ops and all-reduce times are measured for each shipped combination. Every
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

COEFFICIENTS_DIR = Path(__file__).resolve().parent / "coefficients"

#: Batch sizes / token counts held in precomputed per-integer tables (beyond: interpolation on
#: the profiled grid, then linear extrapolation, computed on demand).
DENSE_TABLE_SIZE = 4096

#: Version of the JSON layout written by scripts/fit_latency_model.py.
SCHEMA_VERSION = 2

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
    """Decode attention per layer (ms) for B decode requests of mean context length L tokens:
    ``intercept + B * (per_request + per_context_token * L)``."""

    intercept: float
    per_request: float
    per_context_token: float

    def per_layer_ms(self, batch_size: int, mean_context: float) -> float:
        """Milliseconds per layer for ``batch_size`` requests of ``mean_context`` tokens."""
        return self.intercept + batch_size * (self.per_request + self.per_context_token * mean_context)


@dataclass(frozen=True)
class PrefillAttention:
    """Prefill attention per layer (ms): ``intercept`` once per iteration plus, per chunk,
    ``per_chunk_token*c + per_chunk_prior_token_pair*c*p + per_chunk_causal_pair*c*c/2
    + per_prior_token*p``."""

    intercept: float
    per_chunk_token: float
    per_chunk_prior_token_pair: float
    per_chunk_causal_pair: float
    per_prior_token: float


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
            decode=DecodeAttention(**doc["decode_attention_per_layer_ms"]),
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
    """

    __slots__ = (
        "coefficients",
        "decode_time_per_context_token",
        "_tokens",
        "_lm_head",
        "_overhead",
        "_overhead_per_request",
        "_decode0",
        "_decode_per_request",
        "_prefill0",
        "_prefill_token",
        "_prefill_pair",
        "_prefill_causal",
        "_prefill_prior",
        "_decode_base",
    )

    def __init__(self, coefficients: LatencyCoefficients, overhead_s: float | None = None) -> None:
        c = coefficients
        self.coefficients = c
        layers_s = c.num_layers * _MS  # per-layer ms -> per-iteration s
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
        self._decode0 = c.decode.intercept * layers_s
        self._decode_per_request = c.decode.per_request * layers_s
        self.decode_time_per_context_token: float = c.decode.per_context_token * layers_s
        self._prefill0 = c.prefill.intercept * layers_s
        self._prefill_token = c.prefill.per_chunk_token * layers_s
        self._prefill_pair = c.prefill.per_chunk_prior_token_pair * layers_s
        self._prefill_causal = c.prefill.per_chunk_causal_pair * layers_s / 2.0
        self._prefill_prior = c.prefill.per_prior_token * layers_s
        self._decode_base = [math.nan] + [self._decode_base_uncached(b) for b in range(1, DENSE_TABLE_SIZE + 1)]

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_replica(
        cls, model: str, gpu: str, tensor_parallel: int, overhead_s: float | None = None
    ) -> IterationTimeModel:
        """Load the shipped coefficients of (model, gpu, tensor_parallel).

        ``overhead_s`` replaces the assumed CPU overhead (constant + per request) by this
        constant number of seconds per iteration. Raises ``ValueError`` naming the combination
        and listing the available ones when it is not shipped.
        """
        path = COEFFICIENTS_DIR / _file_name(model, gpu, tensor_parallel)
        if not path.is_file():
            options = ", ".join(f"({m!r}, {g!r}, {t})" for m, g, t in cls.available())
            raise ValueError(
                f"no latency coefficients for model={model!r}, gpu={gpu!r}, "
                f"tensor_parallel={tensor_parallel!r}; available (model, gpu, tp): {options}"
            )
        return cls(LatencyCoefficients.load(path), overhead_s=overhead_s)

    @staticmethod
    def available() -> list[tuple[str, str, int]]:
        """Shipped (model, gpu, tensor_parallel) combinations, sorted."""
        combos = []
        for path in COEFFICIENTS_DIR.glob("*__*__tp*.json"):
            model, gpu, tp = path.stem.split("__")
            combos.append((model, gpu, int(tp[2:])))
        return sorted(combos)

    # ------------------------------------------------------------------ timing

    def _decode_base_uncached(self, batch_size: int) -> float:
        """CPU overhead + token table at B tokens (mlp.csv ops, all-reduce) + LM head at B rows
        + decode attention without its context term, ``num_layers * (d0 + d1*B)``."""
        return (
            self._overhead
            + self._overhead_per_request * batch_size
            + self._tokens(batch_size)
            + self._lm_head(batch_size)
            + self._decode0
            + self._decode_per_request * batch_size
        )

    def decode_base_time(self, batch_size: int) -> float:
        """Seconds of a pure-decode iteration of ``batch_size`` = B (>= 1) requests, excluding
        the ``decode_time_per_context_token * context_tokens`` term: CPU overhead (assumed)
        + non-attention ops at B tokens (``num_layers`` x per-layer ``mlp.csv`` op tables +
        embedding and final norm) + all-reduces at B tokens (network profile, TP > 1) + LM head
        at B rows (scaled ``mlp_up_proj``) + the context-free part of decode attention,
        ``num_layers * (d0 + d1*B)`` (attention profile). Table lookup up to
        ``DENSE_TABLE_SIZE``; beyond it the same formula (linear past the profiled grid)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size <= DENSE_TABLE_SIZE:
            return self._decode_base[batch_size]
        return self._decode_base_uncached(batch_size)

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
        at R rows (scaled ``mlp_up_proj`` table), decode attention ``num_layers * (d0 + B*(d1 +
        d2*L))`` if B >= 1 and prefill attention ``num_layers * (e0 + per-chunk terms)``
        (attention profile), CPU overhead (assumed, or ``overhead_s``).

        Without prefill chunks this is exactly ``decode_base_time(decode_batch) +
        decode_time_per_context_token * decode_context_tokens``.
        """
        if not prefill_chunks:
            return self.decode_base_time(decode_batch) + self.decode_time_per_context_token * decode_context_tokens
        chunk_tokens = 0
        per_chunk = 0.0
        token, pair, causal, prior = (
            self._prefill_token, self._prefill_pair, self._prefill_causal, self._prefill_prior
        )
        for chunk, context in prefill_chunks:
            chunk_tokens += chunk
            per_chunk += chunk * (token + pair * context + causal * chunk) + prior * context
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
            time += (
                self._decode0
                + self._decode_per_request * decode_batch
                + self.decode_time_per_context_token * decode_context_tokens
            )
        return time

    def __repr__(self) -> str:
        c = self.coefficients
        return f"IterationTimeModel({c.model!r}, {c.gpu!r}, tensor_parallel={c.tensor_parallel})"
