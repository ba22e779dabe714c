#!/usr/bin/env python
"""Regenerate the packaged request-length summaries from Vidur's public traces.

Reads ``processed_traces/splitwise_conv.csv`` and
``processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv`` from the Vidur
data folder (MIT licence; see its README.md) and writes ``llm_cluster_env/data/<name>.json``:
an empirical checkerboard copula over per-column quantile tables (format and rationale in
:mod:`llm_cluster_env.workload.generator`), with provenance and summary statistics. Only derived summaries
are written, never raw rows. Output is deterministic (fixed tie-breaking seed)::

    python scripts/summarize_trace.py [--data-dir ../shared/data/vidur] [--out-dir llm_cluster_env/data]

Needs only numpy and the standard library.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMAT = "llm_cluster_env/length-summary/v1"
TIE_BREAK_SEED = 0
PROMPT, OUTPUT, ARRIVAL = "num_prefill_tokens", "num_decode_tokens", "arrived_at"

#: name -> (file under processed_traces/, description)
SOURCES = {
    "splitwise_conv": (
        "splitwise_conv.csv",
        "Azure LLM inference trace, conversation service (Nov 2023), as processed by Vidur; "
        "Llama-2 tokenizer token counts",
    ),
    "arxiv_summarization": (
        "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
        "arXiv summarisation requests as processed by Vidur (filtered to prompt + output <= 4096); "
        "Llama-2 tokenizer token counts; no arrival times",
    ),
}


def quantile_levels() -> np.ndarray:
    """Probability levels of the quantile tables: 0.1 % steps, 0.05 % below p1, 0.02 % above p99."""
    levels = np.concatenate([
        np.linspace(0.0, 0.01, 21), np.linspace(0.01, 0.99, 981), np.linspace(0.99, 1.0, 51),
    ])
    return np.unique(np.round(levels, 6))


def rank_edges() -> np.ndarray:
    """Rank-cell edges of the copula grid (35 cells): 5 % cells, finer in both tails."""
    edges = ([0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075]
             + list(np.arange(0.10, 0.9001, 0.05))
             + [0.925, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.9975, 1.0])
    return np.unique(np.round(edges, 6))


def read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named numeric columns of a CSV file (float64)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"{path}: missing columns {missing} (found {reader.fieldnames})")
        values: dict[str, list[float]] = {c: [] for c in columns}
        for row in reader:
            for c in columns:
                values[c].append(float(row[c]))
    return {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}


def check_tokens(path: Path, name: str, tokens: np.ndarray) -> np.ndarray:
    """Token counts as int64, insisting they are whole numbers >= 1."""
    if not np.all(np.isfinite(tokens)) or np.any(tokens < 1) or np.any(tokens != np.round(tokens)):
        sys.exit(f"{path}: column {name} must hold whole token counts >= 1")
    return tokens.astype(np.int64)


def random_ranks(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mid-ranks ``(rank + 0.5) / n`` in (0, 1) with ties broken at random."""
    n = len(values)
    order = np.lexsort((rng.random(n), values))
    ranks = np.empty(n)
    ranks[order] = (np.arange(n) + 0.5) / n
    return ranks


def copula_counts(prompt: np.ndarray, output: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of requests per (prompt rank cell, output rank cell)."""
    rng = np.random.default_rng(TIE_BREAK_SEED)
    u, v = random_ranks(prompt, rng), random_ranks(output, rng)
    i = np.searchsorted(edges, u, side="right") - 1
    j = np.searchsorted(edges, v, side="right") - 1
    counts = np.zeros((len(edges) - 1, len(edges) - 1), dtype=np.int64)
    np.add.at(counts, (i, j), 1)
    return counts


def column_stats(values: np.ndarray) -> dict[str, float | int]:
    """count, mean, std, min, p50, p90, p99, max of a token column."""
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": int(len(values)), "mean": round(float(values.mean()), 3),
        "std": round(float(values.std()), 3), "min": int(values.min()),
        "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": int(values.max()),
    }


def arrival_stats(arrivals: np.ndarray) -> dict[str, float]:
    """Mean rate (requests/s), span (s) and inter-arrival coefficient of variation."""
    gaps = np.diff(arrivals)
    span = float(arrivals[-1] - arrivals[0])
    return {
        "span_s": round(span, 6),
        "mean_qps": round((len(arrivals) - 1) / span, 6),
        "interarrival_mean_s": round(float(gaps.mean()), 6),
        "interarrival_cv": round(float(gaps.std() / gaps.mean()), 6),
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def avg_ranks(a: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return (ends - (counts - 1) / 2.0)[inverse]
    return float(np.corrcoef(avg_ranks(x), avg_ranks(y))[0, 1])


def vidur_commit(data_dir: Path) -> str | None:
    """The Vidur commit named in the data folder's README.md."""
    readme = data_dir / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"commit\s+([0-9a-f]{40})", readme.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def summarize(name: str, data_dir: Path) -> dict:
    """The length summary of source ``name``."""
    filename, description = SOURCES[name]
    path = data_dir / "processed_traces" / filename
    has_arrivals = name == "splitwise_conv"
    columns = read_columns(path, (ARRIVAL, PROMPT, OUTPUT) if has_arrivals else (PROMPT, OUTPUT))
    prompt = check_tokens(path, PROMPT, columns[PROMPT])
    output = check_tokens(path, OUTPUT, columns[OUTPUT])
    levels, edges = quantile_levels(), rank_edges()
    stats = {
        "prompt_tokens": column_stats(prompt),
        "output_tokens": column_stats(output),
        "total_tokens_max": int((prompt + output).max()),
        "spearman_prompt_output": round(spearman(prompt, output), 6),
    }
    if has_arrivals:
        stats["arrivals"] = arrival_stats(columns[ARRIVAL])
    return {
        "format": FORMAT,
        "name": name,
        "description": description,
        "method": (
            "empirical checkerboard copula: per-column quantile tables (numpy.quantile, "
            "method='inverted_cdf') at quantile_levels, and counts of requests per cell of a "
            "rank grid (ranks (r + 0.5)/n with ties broken at random, seed "
            f"{TIE_BREAK_SEED}); sample a cell by count, a uniform point in it, and map each "
            "coordinate through its quantile table (linear interpolation, rounded to tokens)"
        ),
        "provenance": {
            "source_repository": "https://github.com/microsoft/vidur",
            "source_commit": vidur_commit(data_dir),
            "source_file": f"data/processed_traces/{filename}",
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source_rows": int(len(prompt)),
            "licence": "MIT (Vidur data)",
            "generated_by": "scripts/summarize_trace.py",
        },
        "stats": stats,
        "quantile_levels": levels.tolist(),
        "prompt_tokens_quantiles": np.quantile(prompt, levels, method="inverted_cdf")
        .astype(int).tolist(),
        "output_tokens_quantiles": np.quantile(output, levels, method="inverted_cdf")
        .astype(int).tolist(),
        "copula": {
            "prompt_rank_edges": edges.tolist(),
            "output_rank_edges": edges.tolist(),
            "counts": copula_counts(prompt, output, edges).tolist(),
        },
    }


def write_summary(summary: dict, out_dir: Path) -> Path:
    """Write ``summary`` as ``<out_dir>/<name>.json`` (compact lists, one key per line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{summary['name']}.json"
    lines = ["{"]
    items = list(summary.items())
    for k, (key, value) in enumerate(items):
        sep = "," if k < len(items) - 1 else ""
        if key == "copula":
            rows = ",\n      ".join(json.dumps(r, separators=(",", ":")) for r in value["counts"])
            text = ('{\n    "prompt_rank_edges": ' + json.dumps(value["prompt_rank_edges"])
                    + ',\n    "output_rank_edges": ' + json.dumps(value["output_rank_edges"])
                    + ',\n    "counts": [\n      ' + rows + "\n    ]\n  }")
        elif isinstance(value, list):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        lines.append(f"  {json.dumps(key)}: {text}{sep}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(path.read_text(encoding="utf-8"))  # the hand-formatted file must parse
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared/data/vidur",
                        help="Vidur data folder (default: ../shared/data/vidur from the repo root)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "llm_cluster_env/data",
                        help="where to write <name>.json (default: llm_cluster_env/data)")
    parser.add_argument("--only", choices=sorted(SOURCES), action="append",
                        help="summarise only this source (repeatable)")
    args = parser.parse_args(argv)
    for name in args.only or SOURCES:
        path = write_summary(summarize(name, args.data_dir), args.out_dir)
        print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
