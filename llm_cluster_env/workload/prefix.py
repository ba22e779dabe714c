"""Workloads whose prompts share prefixes: Mooncake traces, multi-turn sessions, system prompts.

Every request of these workloads carries its prompt's block identities as a
:class:`~llm_cluster_env.prefix_chain.PrefixChain`: segments of tokens shared in full by
every request that contains them, each id unique to the whole prefix up to it, the last segment
open-ended (it also covers the generated tokens). A replica with prefix caching turns them into
KV-block identities (:mod:`llm_cluster_env.sim.prefix_cache`).

Mooncake traces (``trace_path`` ending in ``.jsonl``, or ``trace_format="mooncake"``)
-------------------------------------------------------------------------------------
The format of the Mooncake FAST'25 release (``conversation_trace.jsonl``): one JSON object a
line, ``{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}``,
in arrival order. ``hash_ids`` name the prompt's blocks of ``trace_hash_block_tokens`` tokens
(512 for that trace; the last may be partial): two prompts whose lists start with the same k
ids share their first k blocks. Each block becomes a segment whose id is interned from the
chain of ids up to it (so a repeated id after a different prefix is a different segment, as a
chained hash would be); tokens past the last id and the generated tokens form a segment unique
to the request (only prompt hashes exist, so no later request reuses an output). The session
key is the segment of the first two blocks (one if the prompt has one), the affinity key the
issue measured. Lines are validated like trace CSVs: a line that is not a JSON object, a
missing field, a timestamp that is negative or goes backwards, a length that is not a whole
number >= 1, ``hash_ids`` that is not a list of integers >= 0, or more ids than
``ceil(input_length / trace_hash_block_tokens)`` fail with the file, line, field and value.
When a replayed window wraps past the last line, the repeated hour gets new segment ids: it
shares nothing with the first.

Multi-turn sessions (``prefix="multiturn"``)
--------------------------------------------
Sessions start as a Poisson process at ``qps / turns_mean`` sessions/s, so requests arrive at
``qps`` on average. A session has a geometric number of turns (mean ``turns_mean``); turn
``k``'s prompt is the optional shared system prompt, then every earlier turn's new tokens and
output, then its own new tokens; new tokens and outputs are joint draws of the workload's
``lengths`` distribution. Consecutive requests of a session are ``turn_gap_s`` apart on
average (exponential; open loop: the gap includes the time the reply takes, so a turn may
arrive before the previous one finished, and then find less of its prefix cached). A session
ends before the first turn whose prompt and output would exceed ``max_context_tokens`` (default
the request cap). The stream of a session is one segment, so turn ``k + 1`` reuses the blocks
of turn ``k``'s prompt *and* output. Episodes start in steady state: sessions that began up to
``10 * turns_mean * turn_gap_s`` before ``t = 0`` contribute their later turns (with a cold
cache). The session key is the session.

Shared system prompts (``prefix="system_prompt"``)
--------------------------------------------------
``num_prompts`` tenants each have a system prompt (lengths uniform in
``prompt_tokens_range``, drawn once from a private seed: they are part of the workload, not of
the episode); a request picks a tenant with Zipf popularity (probability of the tenant of rank
``r`` proportional to ``r ** -zipf_s``), its prompt is that system prompt followed by a user
part, and the user part and output are joint draws of ``lengths``. Arrivals follow
``arrival``. The session key is the tenant.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from llm_cluster_env.config import MultiTurnConfig, SystemPromptConfig
from llm_cluster_env.prefix_chain import PrefixChain
from llm_cluster_env.workload.requests import Trace, TraceError, readonly_array, trace_error

#: Fields of a Mooncake trace line.
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
#: Private seed of the system prompts' lengths (a property of the workload config).
SYSTEM_PROMPT_SEED = 7_077
#: Sessions may have started this many mean session lengths before the episode.
_WARMUP_SESSION_LENGTHS = 10.0
_MAX_TOKENS = 2**53

LengthSampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Mooncake JSONL traces
# --------------------------------------------------------------------------------------------


def is_mooncake_path(path: str | os.PathLike[str]) -> bool:
    """Whether a trace path names the Mooncake JSONL format (``.jsonl``)."""
    return os.fspath(path).lower().endswith(".jsonl")


def _field_error(path: str, line: int, field: str, value, problem: str) -> TraceError:
    return trace_error(path, line, field, None if value is None else repr(value)[:80], problem)


def _whole_number(path: str, line: int, field: str, value, minimum: int) -> int:
    """``value`` as a whole number >= ``minimum`` (``12.0`` is 12), else a TraceError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(path, line, field, value, "must be a number")
    if not math.isfinite(value) or float(value) != int(value):
        raise _field_error(path, line, field, value, "must be a whole number")
    if value < minimum:
        raise _field_error(path, line, field, value, f"must be >= {minimum}")
    if value >= _MAX_TOKENS:
        raise _field_error(path, line, field, value, "is implausibly large")
    return int(value)


def _parse_mooncake_line(path: str, line: int, text: str, hash_block_tokens: int
                         ) -> tuple[float, int, int, list[int]]:
    """One validated line: ``(timestamp ms, input, output, hash ids)``."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise trace_error(path, line, None, text[:80], f"not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise trace_error(path, line, None, text[:80], "expected a JSON object with fields "
                           + ", ".join(MOONCAKE_FIELDS))
    for field in MOONCAKE_FIELDS:
        if field not in record:
            raise trace_error(path, line, field, None,
                               f"missing field (a line needs {', '.join(MOONCAKE_FIELDS)})")
    stamp = record["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
        raise _field_error(path, line, "timestamp", stamp, "must be a finite number (ms)")
    if stamp < 0:
        raise _field_error(path, line, "timestamp", stamp, "must be >= 0 ms")
    prompt = _whole_number(path, line, "input_length", record["input_length"], 1)
    output = _whole_number(path, line, "output_length", record["output_length"], 1)
    ids = record["hash_ids"]
    if not isinstance(ids, list):
        raise _field_error(path, line, "hash_ids", ids, "must be a list of integers")
    for k, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _field_error(path, line, "hash_ids", value,
                               f"element {k} is not an integer >= 0; hash_ids must be a list of "
                               "integers")
    limit = -(-prompt // hash_block_tokens)
    if len(ids) > limit:
        raise trace_error(path, line, "hash_ids", f"{len(ids)} ids",
                           f"more ids than the prompt has blocks: input_length={prompt} tokens "
                           f"make ceil({prompt} / {hash_block_tokens}) = {limit} blocks of "
                           f"{hash_block_tokens} tokens (trace_hash_block_tokens)")
    return float(stamp), prompt, output, ids


#: Parsed traces by (path, size, mtime, inode, block tokens): an env built per episode (a
#: scenario family) replays the same file without parsing it again. Traces are read-only.
_PARSED: OrderedDict[tuple, Trace] = OrderedDict()
_PARSED_MAX = 4


def load_mooncake_trace(path: str | os.PathLike[str], hash_block_tokens: int = 512) -> Trace:
    """Parse and validate a Mooncake JSONL trace (module docstring); arrival times in seconds.

    A file parsed before and unchanged since (same size, modification time and inode) is not
    parsed again: the same read-only :class:`Trace` is returned (the last few are kept).

    :param path: the ``.jsonl`` file.
    :param hash_block_tokens: tokens per ``hash_ids`` block (512 for the Mooncake release).
    :raises TraceError: naming the file, line, field and value of the first defect.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise trace_error(name, None, None, None, "trace file not found")
    if not os.path.isfile(name):
        raise trace_error(name, None, None, None, "not a regular file")
    stat = os.stat(name)
    key = (name, stat.st_size, stat.st_mtime_ns, stat.st_ino, hash_block_tokens)
    trace = _PARSED.get(key)
    if trace is None:
        trace = _parse_mooncake_trace(name, hash_block_tokens)
        _PARSED[key] = trace
        while len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    else:
        _PARSED.move_to_end(key)
    return trace


def _parse_mooncake_trace(name: str, hash_block_tokens: int) -> Trace:
    """Parse and validate the Mooncake JSONL trace ``name`` (see :func:`load_mooncake_trace`)."""
    arrivals: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    lines: list[int] = []
    segments: list[tuple[int, ...]] = []
    intern: dict[tuple[int, int], int] = {}
    previous, previous_line = -math.inf, 0
    try:
        with open(name, encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                stamp, prompt, output, ids = _parse_mooncake_line(name, line, text,
                                                                  hash_block_tokens)
                if stamp < previous:
                    raise _field_error(name, line, "timestamp", stamp,
                                       f"goes backwards: line {previous_line} arrived at "
                                       f"{previous!r} ms; timestamps must be non-decreasing")
                previous, previous_line = stamp, line
                chain = []
                parent = -1
                for raw in ids:
                    key = (parent, raw)
                    parent = intern.get(key, -1)
                    if parent < 0:
                        parent = intern[key] = len(intern)
                    chain.append(parent)
                arrivals.append(stamp / 1000.0)
                prompts.append(prompt)
                outputs.append(output)
                lines.append(line)
                segments.append(tuple(chain))
    except UnicodeDecodeError as err:
        raise trace_error(name, None, None, None, f"not a UTF-8 text file: {err}") from None
    if not arrivals:
        raise trace_error(name, 1, None, None, "no request lines (expected one JSON object "
                           "a line with " + ", ".join(MOONCAKE_FIELDS) + ")")
    keys = np.array([seg[min(1, len(seg) - 1)] if seg else -1 for seg in segments],
                    dtype=np.int64)
    return Trace(
        arrival_times=readonly_array(arrivals, np.float64),
        prompt_tokens=readonly_array(prompts, np.int64),
        output_tokens=readonly_array(outputs, np.int64),
        path=name,
        line_numbers=readonly_array(lines, np.int64),
        segments=tuple(segments),
        session_keys=readonly_array(keys, np.int64),
        hash_block_tokens=hash_block_tokens,
        num_segments=len(intern),
    )


def trace_chains(trace: Trace, rows: np.ndarray, cycles: np.ndarray | None = None
                 ) -> tuple[PrefixChain, ...]:
    """The chains of trace rows ``rows`` served as requests ``0..n-1`` of an episode.

    ``cycles`` (per request, how many times the window wrapped past the last row) shift the
    segment ids so that a repeated hour shares nothing with the first; request ``j``'s own
    tail segment is ``-(j + 1)``.
    """
    assert trace.segments is not None and trace.hash_block_tokens is not None
    block = trace.hash_block_tokens
    stride = trace.num_segments
    keys = trace.session_keys
    prompts = trace.prompt_tokens
    chains = []
    for j, row in enumerate(np.asarray(rows).tolist()):
        segs = trace.segments[row]
        shift = 0 if cycles is None else int(cycles[j]) * stride
        n = len(segs)
        prompt = int(prompts[row])
        ids = tuple(s + shift for s in segs) + (-(j + 1),)
        starts = tuple(range(0, n * block, block)) + (min(prompt, n * block),)
        key = int(keys[row])
        chains.append(PrefixChain(ids, starts, key + shift if key >= 0 else -1))
    return tuple(chains)


# --------------------------------------------------------------------------------------------
# Synthetic generators
# --------------------------------------------------------------------------------------------


def multiturn_sessions(n: int, qps: float, config: MultiTurnConfig, sample_lengths: LengthSampler,
                       max_total_tokens: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[PrefixChain, ...]]:
    """The first ``n`` requests (at ``t >= 0``) of multi-turn sessions (module docstring):
    arrival times (seconds), prompt and output lengths (tokens) and chains, by arrival."""
    cap = config.max_context_tokens or max_total_tokens
    system = config.system_prompt_tokens
    session_rate = qps / config.turns_mean
    warmup = _WARMUP_SESSION_LENGTHS * config.turns_mean * config.turn_gap_s
    horizon = 1.5 * n / qps + config.turn_gap_s
    while True:
        sessions = int(rng.poisson(session_rate * (warmup + horizon)))
        starts = np.sort(rng.uniform(-warmup, horizon, sessions))
        turns = rng.geometric(1.0 / config.turns_mean, sessions)
        total = int(turns.sum())
        new, output = sample_lengths(total, rng)
        gaps = rng.exponential(config.turn_gap_s, total)
        session = np.repeat(np.arange(sessions), turns)
        first = np.concatenate(([0], np.cumsum(turns)[:-1]))
        turn = np.arange(total) - first[session]
        gaps[first] = 0.0
        times = starts[session] + _cumsum_by_group(gaps, first, session)
        grown = new + output
        history = _cumsum_by_group(grown, first, session) - grown  # earlier turns' tokens
        prompt = system + history + new
        # a session ends before its first turn (after the first) that would not fit
        over = (prompt + output > cap) & (turn > 0)
        keep = _before_session_end(over, session, first) & (times >= 0.0) & (times <= horizon)
        if int(keep.sum()) >= n:
            break
        horizon *= 2.0
    order = np.flatnonzero(keep)
    order = order[np.argsort(times[order], kind="stable")][:n]
    chains = tuple(
        PrefixChain((0, 1 + s), (0, system), 1 + s) if system else PrefixChain((1 + s,), (0,), 1 + s)
        for s in session[order].tolist())
    return times[order], prompt[order].astype(np.int64), output[order].astype(np.int64), chains


def _cumsum_by_group(values: np.ndarray, first: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each group's first index (groups are contiguous)."""
    total = np.cumsum(values)
    offset = np.concatenate(([0], total[first[1:] - 1])) if len(first) else np.zeros(0)
    return total - offset[group]


def _before_session_end(over: np.ndarray, session: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per turn: no earlier-or-same turn of its session exceeds the cap (contiguous groups)."""
    count = np.cumsum(over.astype(np.int64))
    base = np.concatenate(([0], count[first[1:] - 1])) if len(first) else np.zeros(0, np.int64)
    return (count - base[session]) == 0


def system_prompt_lengths(config: SystemPromptConfig) -> np.ndarray:
    """The tenants' system-prompt lengths (tokens), from the private :data:`SYSTEM_PROMPT_SEED`."""
    lo, hi = config.prompt_tokens_range
    return np.random.default_rng(SYSTEM_PROMPT_SEED).integers(lo, hi, config.num_prompts,
                                                              endpoint=True)


def system_prompt_requests(user_prompt: np.ndarray, config: SystemPromptConfig,
                           rng: np.random.Generator
                           ) -> tuple[np.ndarray, tuple[PrefixChain, ...]]:
    """Prompts (tokens) and chains of requests whose user parts are ``user_prompt`` (tokens),
    each after the system prompt of a Zipf-popular tenant (module docstring)."""
    lengths = system_prompt_lengths(config)
    weights = np.arange(1, config.num_prompts + 1, dtype=np.float64) ** -config.zipf_s
    tenant = rng.choice(config.num_prompts, size=len(user_prompt), p=weights / weights.sum())
    system = lengths[tenant]
    chains = tuple(PrefixChain((t, -(j + 1)), (0, s), t)
                   for j, (t, s) in enumerate(zip(tenant.tolist(), system.tolist())))
    return system + np.asarray(user_prompt, dtype=np.int64), chains


__all__ = [
    "MOONCAKE_FIELDS",
    "SYSTEM_PROMPT_SEED",
    "is_mooncake_path",
    "load_mooncake_trace",
    "multiturn_sessions",
    "system_prompt_lengths",
    "system_prompt_requests",
    "trace_chains",
]
