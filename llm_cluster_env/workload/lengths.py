"""Request lengths: packaged empirical length summaries (format ``llm_cluster_env/length-summary/v1``, see the package docs), log-normal lengths and the oversize (clip) rule."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.validation import ConfigError
from llm_cluster_env.workload.requests import Trace

#: Packaged length summaries live here as ``<name>.json``.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: ``format`` tag of a packaged length summary.
SUMMARY_FORMAT = "llm_cluster_env/length-summary/v1"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")

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


def oversize_message(index: int, prompt: int, output: int, max_total: int,
                      trace: Trace | None, row: int | None) -> str:
    """Error text for ``oversize_policy="error"``."""
    source = f" (trace line {trace.line_of(row)} of {trace.path})" if trace is not None \
        and row is not None else ""
    return (
        f"request {index}{source}: prompt_tokens={prompt} + output_tokens={output} = "
        f"{prompt + output} tokens exceeds max_total_tokens={max_total}; "
        "oversize_policy='error' (use 'clip' or 'reject', or raise max_total_tokens)"
    )
