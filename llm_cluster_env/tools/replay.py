"""Replay a request file exactly on a scenario's cluster; write one CSV row per request.

Usage::

    python -m llm_cluster_env.tools.replay --requests requests.csv --scenario a100x4_conv_70 \\
        --router lor --out per_request.csv [--seed 0] [--set KEY=VALUE ...]

``--requests`` is a CSV with (at least) the columns ``arrived_at,num_prefill_tokens,
num_decode_tokens``: arrival time (seconds), prompt and output length (tokens), one request per
row, arrivals non-decreasing; or a Mooncake JSONL trace (``.jsonl``: ``timestamp`` in ms,
``input_length``, ``output_length``, ``hash_ids``; see :mod:`llm_cluster_env.workload.prefix`),
whose prompts then carry their block identities for replicas with prefix caching (the
scenario's ``replica.prefix_caching``; ``workload.trace_hash_block_tokens`` gives the hash block
size). Every row is served, in file order from row 0, at exactly its own arrival time: nothing
is resampled, rescaled, shifted or wrapped.

``--scenario`` (a packaged name or a YAML path) gives the cluster: replicas, hardware,
batching, SLO targets and the workload's token cap (``max_total_tokens``) and
``oversize_policy``. ``--set`` overrides any :class:`~llm_cluster_env.config.EnvConfig` field,
dotted, the value parsed as YAML (``--set num_replicas=8 --set
workload.oversize_policy=reject``). The scenario's arrival process and length distribution are
not used, except that the mean output length of its distribution stays the prior of the
deployable decode-work estimate in the observation (``decode_tokens_k``, used by routers such as
``least_tokens``), as in a deployment tuned for that scenario.

``--router`` names a router of :data:`llm_cluster_env.routing.registry.ALL_ROUTERS` (the
heuristics, ``lookahead`` and the planners); it draws any randomness (ties of ``lor``,
``random``) from ``numpy.random.default_rng(seed + 7919)``, like
:func:`llm_cluster_env.tools.evaluation.run_episode`, so one ``--seed`` gives one result.

Output (``--out``): one row per input row, in input order, with the columns of
:data:`llm_cluster_env.sim.metrics.REQUEST_COLUMNS` (the schema of the env's
``info["requests"]``): ``request_id`` (the 0-based data row of the input), ``arrival_s``,
``prompt_tokens``, ``output_tokens`` (as served), ``replica``, ``scheduling_delay_s``,
``ttft_s``, ``e2e_s``, ``tpot_s`` (empty for one-token outputs) and ``preemptions``, and with
prefix caching ``cached_prompt_tokens`` and ``host_prompt_tokens``. Oversized
requests (prompt + output over the cap) follow the scenario's ``oversize_policy``:

* ``clip``: served shortened; the token columns hold the served lengths and the summary counts
  the clipped requests;
* ``reject``: not served; the row stays, with ``replica = -1`` and empty latency fields, and
  the summary counts the rejected requests;
* ``error``: the replay fails, naming the row's file line.

The file is written to a temporary sibling and renamed into place (``os.replace``), so an
interrupted or failed run never leaves a truncated file. A summary (mean/p50/p90/p99 of each
latency, throughput, SLO attainment, dispatch shares; see :mod:`llm_cluster_env.sim.metrics`) is
printed.

Exit status 0 on success; 2 with a one-line message naming the field or file and value (no
traceback) for bad arguments or input: a missing or malformed file, a missing column, an
unknown router or scenario, an invalid ``--set``.

From Python, :func:`replay` returns the same records and metrics without writing anything.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_cluster_env.atomic import atomic_write_text
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.base import Router
from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
from llm_cluster_env.sim.metrics import (
    INTEGER_COLUMNS,
    PERCENTILES,
    PREFIX_REQUEST_COLUMNS,
    REQUEST_COLUMNS,
)
from llm_cluster_env.tools.evaluation import run_episode
from llm_cluster_env.validation import deep_merge
from llm_cluster_env.workload import Trace, Workload, load_trace
from llm_cluster_env.workload.prefix import trace_chains

#: ``replica`` of a request that ``oversize_policy="reject"`` dropped.
REJECTED_REPLICA = -1

_LATENCY_COLUMNS = ("scheduling_delay_s", "ttft_s", "e2e_s", "tpot_s")


class ReplayError(ValueError):
    """The requests cannot be replayed as asked (the message names the file, line or field)."""


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` produced.

    :param records: one entry per input row, ``column -> array`` in
        :data:`~llm_cluster_env.sim.metrics.REQUEST_COLUMNS` order (rejected rows: replica -1,
        NaN latencies, 0 preemptions).
    :param metrics: the episode statistics of the served requests (the env's
        ``info["metrics"]``; ``num_rejected`` and ``num_clipped`` count oversized requests).
    :param rejected: per input row, dropped by ``oversize_policy="reject"``.
    :param clipped: per input row, served with fewer tokens than the input asked for.
    :param env: the environment after the episode (its cluster holds every request).
    """

    records: dict[str, np.ndarray]
    metrics: dict[str, float]
    rejected: np.ndarray
    clipped: np.ndarray
    env: LLMClusterEnv

    def __len__(self) -> int:
        """Number of input rows."""
        return int(self.rejected.size)


# --------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------


def _served_workload(env: LLMClusterEnv, trace: Trace) -> tuple[Workload, np.ndarray]:
    """The trace's rows after the env's oversize policy, at their own arrival times, and the
    per-row mask of rows that are served (False = rejected).

    The policy is the env's own workload generator's
    (:meth:`~llm_cluster_env.workload.generator.WorkloadGenerator.apply_oversize_policy`), so
    clip/reject/error behave exactly as in an episode; arrival replay through ``sample`` would
    shift times to start at 0.
    """
    generator = env.workload
    times, prompt, output = trace.arrival_times, trace.prompt_tokens, trace.output_tokens
    over = prompt + output > generator.max_total_tokens
    chains = None
    if trace.segments is not None:
        chains = trace_chains(trace, np.arange(len(trace)))
    try:
        workload = generator.apply_oversize_policy(times, prompt, output, chains=chains)
    except ValueError as err:
        first = int(np.argmax(over))
        raise ReplayError(f"{trace.path}, line {trace.line_of(first)} (data row {first}): "
                          f"{err}") from None
    if len(workload) == len(trace):
        return workload, np.ones(len(trace), dtype=bool)
    if len(workload) == len(trace) - int(over.sum()):
        return workload, ~over
    raise RuntimeError(f"oversize_policy={generator.config.oversize_policy!r} kept "
                       f"{len(workload)} of {len(trace)} requests ({int(over.sum())} oversized): "
                       "cannot tell which rows were served")


def replay(requests: str | os.PathLike[str] | Trace, env_kwargs: Mapping[str, Any] | None = None,
           router: str | Router = "lor", seed: int = 0) -> ReplayResult:
    """Serve every request of a file (or loaded trace) at its own arrival time, once.

    :param requests: a CSV path (``arrived_at,num_prefill_tokens,num_decode_tokens``), a
        Mooncake JSONL path (``.jsonl``), or a :class:`~llm_cluster_env.workload.generator.Trace` from
        :func:`~llm_cluster_env.workload.generator.load_trace`.
    :param env_kwargs: ``LLMCluster-v0`` keyword arguments, e.g. ``{"scenario":
        "a100x4_conv_70", "num_replicas": 8}``; they define the cluster and the oversize policy.
    :param router: a router name (see :mod:`llm_cluster_env.routing.heuristics`) or instance.
    :param seed: episode seed; the router draws from ``default_rng(seed + 7919)``.
    :raises TraceError: the file is missing or malformed (names file, line, column, value).
    :raises ConfigError: invalid ``env_kwargs`` (names the field and value).
    :raises ReplayError: ``oversize_policy="error"`` met an oversized request (names its line).
    :raises ValueError: unknown router name, or every request was rejected.
    """
    if isinstance(router, str):
        router = make_any_router(router)
    env = LLMClusterEnv(**dict(env_kwargs or {}))
    workload_config = env.config.workload
    trace = requests if isinstance(requests, Trace) else load_trace(
        requests, workload_config.trace_format, workload_config.trace_hash_block_tokens)
    workload, served = _served_workload(env, trace)
    if len(workload) == 0:
        raise ReplayError(f"{trace.path}: every one of the {len(trace)} requests exceeds "
                          f"max_total_tokens={env.workload.max_total_tokens} and "
                          "oversize_policy='reject' drops them all")
    metrics, _ = run_episode(env, router, seed, options={"workload": workload})
    served_records = env.request_records()
    if len(served_records["request_id"]) != len(workload):
        raise RuntimeError(f"{len(workload)} requests dispatched but "
                           f"{len(served_records['request_id'])} finished")
    rows = np.flatnonzero(served)  # input row of each served request, in request-id order
    records = _empty_records(len(trace), env.caches_prefixes)
    for name, values in served_records.items():
        records[name][rows] = values
    records["request_id"] = np.arange(len(trace), dtype=np.int64)
    records["arrival_s"] = np.array(trace.arrival_times, dtype=np.float64)
    records["prompt_tokens"][~served] = trace.prompt_tokens[~served]
    records["output_tokens"][~served] = trace.output_tokens[~served]
    clipped = served & ((records["prompt_tokens"] != trace.prompt_tokens)
                        | (records["output_tokens"] != trace.output_tokens))
    return ReplayResult(records, metrics, ~served, clipped, env)


def _empty_records(n: int, prefix: bool = False) -> dict[str, np.ndarray]:
    """Records of ``n`` unserved requests: replica -1, NaN latencies, 0 of everything else
    (with the prefix-cache columns when ``prefix``)."""
    names = REQUEST_COLUMNS + (PREFIX_REQUEST_COLUMNS if prefix else ())
    records = {name: np.zeros(n, dtype=np.int64 if name in INTEGER_COLUMNS else np.float64)
               for name in names}
    records["replica"][:] = REJECTED_REPLICA
    for name in _LATENCY_COLUMNS:
        records[name][:] = np.nan
    return records


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _cell(value: int | float) -> str:
    """A CSV cell: integers as integers, floats round-trippable, NaN as empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_records_csv(path: str | os.PathLike[str], records: Mapping[str, np.ndarray]) -> Path:
    """Write per-request records (``column -> array``, all columns of
    :data:`~llm_cluster_env.sim.metrics.REQUEST_COLUMNS`, then the
    :data:`~llm_cluster_env.sim.metrics.PREFIX_REQUEST_COLUMNS` if present) as CSV, atomically.

    The file is replaced atomically (:func:`llm_cluster_env.atomic.atomic_write_text`): on any
    failure ``path`` is left as it was and no temporary file remains.
    """
    missing = [name for name in REQUEST_COLUMNS if name not in records]
    if missing:
        raise ValueError(f"records: missing column(s) {missing} (need {list(REQUEST_COLUMNS)})")
    names = REQUEST_COLUMNS
    if all(name in records for name in PREFIX_REQUEST_COLUMNS):
        names += PREFIX_REQUEST_COLUMNS
    columns = [np.asarray(records[name]).tolist() for name in names]
    if len({len(c) for c in columns}) > 1:
        raise ValueError("records: columns differ in length: "
                         + ", ".join(f"{n}={len(c)}" for n, c in zip(names, columns)))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(names)
    writer.writerows([_cell(v) for v in row] for row in zip(*columns))
    return atomic_write_text(path, text.getvalue())


def format_summary(result: ReplayResult) -> str:
    """A plain-text summary: latency percentiles, counts, throughput, SLO attainment, shares."""
    m = result.metrics
    lines = [f"{'latency (s)':<18}" + "".join(f"{h:>10}" for h in
                                            ["mean"] + [f"p{p}" for p in PERCENTILES])]
    for label, key in (("scheduling delay", "queueing"), ("TTFT", "ttft"), ("E2E", "e2e"),
                       ("TPOT", "tpot")):
        cells = [m[f"{key}_mean"]] + [m[f"{key}_p{p}"] for p in PERCENTILES]
        lines.append(f"{label:<18}" + "".join(f"{v:>10.4f}" for v in cells))
    n_rows, n_served = len(result), int(m["num_requests"])
    lines += [
        "",
        f"requests: {n_rows} in the file, {n_served} served, "
        f"{int(result.rejected.sum())} rejected (replica {REJECTED_REPLICA} in the output), "
        f"{int(result.clipped.sum())} clipped (oversize_policy="
        f"{result.env.config.workload.oversize_policy!r}, max_total_tokens="
        f"{result.env.workload.max_total_tokens})",
        f"makespan {m['makespan_s']:.3f} s; throughput {m['throughput_rps']:.3f} req/s, "
        f"{m['throughput_tps']:.1f} output tok/s",
        f"SLO attainment {100 * m['slo_attainment']:.1f} % (TTFT <= "
        f"{result.env.config.slo.ttft_s} s: {100 * m['slo_ttft_attainment']:.1f} %, TPOT <= "
        f"{result.env.config.slo.tpot_s} s: {100 * m['slo_tpot_attainment']:.1f} %)",
        f"preemptions {m['preemptions_total']:.0f} (requests preempted "
        f"{100 * m['preempted_fraction']:.1f} %)",
        "dispatch shares " + " ".join(f"{m[f'dispatch_share_{i}']:.3f}"
                                      for i in range(result.env.num_replicas))
        + f" (balance {m['balance']:.3f})",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--set a.b=value`` items as nested env keyword arguments (values parsed as YAML)."""
    out: dict[str, Any] = {}
    if not items:
        return out
    import yaml

    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            parser.error(f"--set {item!r}: value is not valid YAML: {err}")
        parts = key.strip().split(".")
        if parts[0] == "scenario":
            parser.error(f"--set {item!r}: use --scenario")
        patch: dict[str, Any] = value
        for part in reversed(parts):
            patch = {part: patch}
        out = deep_merge(out, patch)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm_cluster_env.tools.replay",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, metavar="FILE",
                        help="CSV with columns arrived_at,num_prefill_tokens,num_decode_tokens, "
                             "or a Mooncake JSONL trace (.jsonl)")
    parser.add_argument("--scenario", required=True,
                        help="packaged scenario name or YAML path: the cluster to replay on")
    parser.add_argument("--router", default="lor", help=f"router ({', '.join(ALL_ROUTERS)})")
    parser.add_argument("--out", required=True, metavar="OUT.csv",
                        help="per-request CSV to write (atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router's randomness")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an env config field, dotted, value parsed as YAML "
                             "(e.g. workload.oversize_policy=reject); repeatable")
    args = parser.parse_args(argv)
    if args.router not in ALL_ROUTERS:
        parser.error(f"--router={args.router!r}: unknown router (known: {', '.join(ALL_ROUTERS)})")
    if args.seed < 0:
        parser.error(f"--seed={args.seed}: must be >= 0")
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():
        parser.error(f"--out={args.out!r}: directory {str(out_dir)!r} does not exist")
    if Path(args.out).is_dir():
        parser.error(f"--out={args.out!r}: is a directory; name the CSV file to write")
    args.env_kwargs = {"scenario": args.scenario, **_overrides(args.set, parser)}
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 with a message on stderr for bad input)."""
    args = parse_args(argv)
    try:
        result = replay(args.requests, args.env_kwargs, args.router, args.seed)
        write_records_csv(args.out, result.records)
    except (ValueError, OSError, ImportError) as err:  # ConfigError, TraceError, ReplayError
        print(f"replay: error: {err}", file=sys.stderr)
        return 2
    print(f"replayed {len(result)} requests from {args.requests} on {args.scenario} "
          f"({result.env.num_replicas} replicas) with router {args.router}, seed {args.seed}")
    print(format_summary(result))
    print(f"wrote {args.out}")
    return 0


__all__ = ["REJECTED_REPLICA", "ReplayError", "ReplayResult", "format_summary",
           "main", "replay", "write_records_csv"]


if __name__ == "__main__":
    sys.exit(main())
