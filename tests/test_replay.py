"""Exact replay of a request file: per-request records, oversize policies, CSV output, CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.sim.metrics import INTEGER_COLUMNS, REQUEST_COLUMNS
from llm_cluster_env.tools.replay import (
    REJECTED_REPLICA,
    ReplayError,
    main,
    replay,
    write_records_csv,
)
from llm_cluster_env.workload import TraceError

pytest.importorskip("yaml")  # scenarios are YAML files

SCENARIO = {"scenario": "a100x4_conv_70"}
OVERSIZED_ROWS = (7, 33)  # prompt + output over Llama-2's 4,096-token context


def write_requests(path, n=160, seed=0):
    """A request CSV: Poisson arrivals from t = 3 s at ~12 req/s, a few one-token outputs, two
    oversized requests and an extra column; returns (arrivals, prompts, outputs)."""
    rng = np.random.default_rng(seed)
    arrivals = np.round(3.0 + np.cumsum(rng.exponential(1 / 12, n)), 6)
    prompts = rng.integers(20, 2000, n)
    outputs = rng.integers(1, 400, n)
    outputs[::17] = 1
    prompts[list(OVERSIZED_ROWS)] = [4000, 3900]
    outputs[list(OVERSIZED_ROWS)] = [500, 300]
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens,user"]
    rows = zip(arrivals.tolist(), prompts.tolist(), outputs.tolist())
    lines += [f"{t!r},{p},{o},u{i % 3}" for i, (t, p, o) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return arrivals, prompts, outputs


@pytest.fixture
def requests_csv(tmp_path):
    path = tmp_path / "requests.csv"
    return path, write_requests(path)


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_clip_replay_has_one_consistent_record_per_input_row(requests_csv):
    path, (arrivals, prompts, outputs) = requests_csv
    result = replay(path, SCENARIO, "lor", seed=0)
    rec = result.records
    n = len(arrivals)
    assert len(result) == n and tuple(rec) == REQUEST_COLUMNS
    assert all(values.shape == (n,) for values in rec.values())
    np.testing.assert_array_equal(rec["request_id"], np.arange(n))
    np.testing.assert_array_equal(rec["arrival_s"], arrivals)  # exactly as given, not shifted
    assert not result.rejected.any()
    assert 0 <= rec["replica"].min() and rec["replica"].max() < 4
    assert np.all(rec["e2e_s"] >= rec["ttft_s"])
    assert np.all(rec["ttft_s"] >= rec["scheduling_delay_s"])
    assert np.all(rec["scheduling_delay_s"] >= 0)
    assert np.array_equal(np.isnan(rec["tpot_s"]), rec["output_tokens"] == 1)
    # tokens equal the input, except the oversized rows, which are clipped under the cap
    fits = np.ones(n, dtype=bool)
    fits[list(OVERSIZED_ROWS)] = False
    np.testing.assert_array_equal(rec["prompt_tokens"][fits], prompts[fits])
    np.testing.assert_array_equal(rec["output_tokens"][fits], outputs[fits])
    cap = result.env.workload.max_total_tokens
    assert cap == 4096
    assert np.all(rec["prompt_tokens"] + rec["output_tokens"] <= cap)
    assert np.all(rec["prompt_tokens"] >= 1) and np.all(rec["output_tokens"] >= 1)
    np.testing.assert_array_equal(np.flatnonzero(result.clipped), OVERSIZED_ROWS)
    assert result.metrics["num_clipped"] == 2 and result.metrics["num_requests"] == n
    assert result.metrics["e2e_mean"] == pytest.approx(rec["e2e_s"].mean())
    # the records are the simulator's own timestamps
    for request, row in zip(result.env.cluster.requests, range(n)):
        assert rec["ttft_s"][row] == request.first_token_time - request.arrival_time
        assert rec["preemptions"][row] == request.num_preemptions


def test_replay_is_deterministic_per_seed(requests_csv):
    path, _ = requests_csv
    a, b = replay(path, SCENARIO, "lor", seed=4), replay(path, SCENARIO, "lor", seed=4)
    for name in REQUEST_COLUMNS:
        np.testing.assert_array_equal(a.records[name], b.records[name])
    assert a.metrics == pytest.approx(b.metrics, nan_ok=True)
    other = [replay(path, SCENARIO, "lor", seed=s).records["replica"] for s in range(5, 8)]
    assert any(not np.array_equal(a.records["replica"], o) for o in other)  # ties are random


def test_reject_keeps_a_row_for_every_request(requests_csv):
    path, (arrivals, prompts, _) = requests_csv
    kwargs = {**SCENARIO, "workload": {"oversize_policy": "reject"}}
    result = replay(path, kwargs, "round_robin")
    rec = result.records
    assert len(rec["request_id"]) == len(arrivals)
    np.testing.assert_array_equal(np.flatnonzero(result.rejected), OVERSIZED_ROWS)
    rejected = list(OVERSIZED_ROWS)
    assert np.all(rec["replica"][rejected] == REJECTED_REPLICA)
    for name in ("scheduling_delay_s", "ttft_s", "e2e_s", "tpot_s"):
        assert np.all(np.isnan(rec[name][rejected]))
    np.testing.assert_array_equal(rec["prompt_tokens"][rejected], prompts[rejected])
    np.testing.assert_array_equal(rec["arrival_s"], arrivals)
    served = ~result.rejected
    assert np.all((rec["replica"][served] >= 0) & (rec["replica"][served] < 4))
    assert np.all(rec["e2e_s"][served] > 0)
    assert result.metrics["num_rejected"] == 2
    assert result.metrics["num_requests"] == len(arrivals) - 2


def test_error_policy_names_the_line(requests_csv):
    path, _ = requests_csv
    kwargs = {**SCENARIO, "workload": {"oversize_policy": "error"}}
    with pytest.raises(ReplayError, match=rf"line {OVERSIZED_ROWS[0] + 2} .*4000"):
        replay(path, kwargs)


def test_csv_schema_equals_env_info_schema_and_values_round_trip(requests_csv, tmp_path):
    path, _ = requests_csv
    result = replay(path, SCENARIO, "lor", seed=1)
    out = write_records_csv(tmp_path / "out.csv", result.records)
    header, rows = read_csv(out)
    env = LLMClusterEnv(**SCENARIO, episode_requests=30)
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(0)
    assert header == list(info["requests"]) == list(REQUEST_COLUMNS)
    assert len(rows) == len(result)
    for j, name in enumerate(header):
        cells = [row[j] for row in rows]
        if name in INTEGER_COLUMNS:
            np.testing.assert_array_equal([int(c) for c in cells], result.records[name])
        else:
            parsed = [float(c) if c else np.nan for c in cells]
            np.testing.assert_array_equal(parsed, result.records[name])  # exact, NaN = empty


def test_write_is_atomic_on_failure(requests_csv, tmp_path, monkeypatch):
    path, _ = requests_csv
    records = replay(path, SCENARIO, "lor").records
    out = tmp_path / "out.csv"
    out.write_text("previous complete file\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_records_csv(out, records)
    assert out.read_text() == "previous complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "requests.csv"]


def test_cli_writes_records_and_prints_the_summary(requests_csv, tmp_path, capsys):
    path, (arrivals, _, _) = requests_csv
    out = tmp_path / "per_request.csv"
    status = main(["--requests", str(path), "--scenario", "a100x4_conv_70", "--router",
                   "lor_waiting", "--out", str(out), "--seed", "3",
                   "--set", "workload.oversize_policy=reject", "--set", "num_replicas=2"])
    assert status == 0
    header, rows = read_csv(out)
    assert header == list(REQUEST_COLUMNS) and len(rows) == len(arrivals)
    replicas = [int(r[header.index("replica")]) for r in rows]
    assert set(replicas) <= {REJECTED_REPLICA, 0, 1}
    assert replicas.count(REJECTED_REPLICA) == 2
    text = capsys.readouterr().out
    assert "2 rejected" in text and "E2E" in text and "p99" in text and "SLO attainment" in text
    expected = replay(path, {**SCENARIO, "num_replicas": 2,
                             "workload": {"oversize_policy": "reject"}}, "lor_waiting", seed=3)
    assert replicas == expected.records["replica"].tolist()


@pytest.mark.parametrize(("content", "argv", "message"), [
    (None, [], "trace file not found"),
    ("arrived_at,prompt,num_decode_tokens\n0.0,10,10\n", [], "missing column(s) "
     "'num_prefill_tokens'"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,x\n", [],
     "line 2, column 'num_decode_tokens': not a number"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,10\n", ["--scenario", "nope"],
     "scenario='nope': unknown scenario"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,10\n",
     ["--set", "workload.oversize_polcy=clip"], "workload.oversize_polcy: unknown key"),
])
def test_cli_bad_input_exits_nonzero_with_a_message(tmp_path, capsys, content, argv, message):
    path = tmp_path / "in.csv"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out.csv"
    status = main(["--requests", str(path), "--scenario", "a100x4_conv_70", "--out", str(out)]
                  + argv)
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (
        ["in.csv"] if content is not None else [])


def test_cli_unknown_router_is_a_usage_error(requests_csv, tmp_path, capsys):
    path, _ = requests_csv
    with pytest.raises(SystemExit) as exit_info:
        main(["--requests", str(path), "--scenario", "a100x4_conv_70", "--router", "fastest",
              "--out", str(tmp_path / "o.csv")])
    assert exit_info.value.code == 2
    assert "--router='fastest': unknown router" in capsys.readouterr().err


def test_cli_process_fails_cleanly_on_a_missing_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llm_cluster_env.tools.replay", "--requests", str(tmp_path / "no.csv"),
         "--scenario", "a100x4_conv_70", "--out", str(tmp_path / "o.csv")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no.csv: trace file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_trace_raises_trace_error(tmp_path):
    with pytest.raises(TraceError, match="trace file not found"):
        replay(tmp_path / "none.csv", SCENARIO)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed=-1: must be >= 0"),
    (["--out", "DIR"], "is a directory"),
])
def test_cli_refuses_bad_seed_and_directory_output_before_replaying(tmp_path, extra, message,
                                                                    capsys):
    requests = tmp_path / "requests.csv"
    write_requests(requests, n=40)
    out = str(tmp_path / "out.csv")
    extra = [str(tmp_path) if a == "DIR" else a for a in extra]
    if "--out" in extra:
        out = extra[extra.index("--out") + 1]
        extra = [a for a in extra if a not in ("--out", out)]
    with pytest.raises(SystemExit) as exit_info:
        main(["--requests", str(requests), "--scenario", "a100x4_conv_70", "--out", out, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_absolute_timestamps_keep_full_latency_precision(tmp_path):
    """A trace stamped near 1e12 s gives the latencies of the same trace starting at 0."""
    near_zero = tmp_path / "zero.csv"
    arrivals, prompts, outputs = write_requests(near_zero, n=40)
    shifted = tmp_path / "shifted.csv"
    lines = ["arrived_at,num_prefill_tokens,num_decode_tokens"]
    lines += [f"{float(1e12 + t - 3.0)!r},{p},{o}" for t, p, o in zip(arrivals, prompts, outputs)]
    shifted.write_text("\n".join(lines) + "\n")
    base = replay(near_zero, SCENARIO, "round_robin")
    far = replay(shifted, SCENARIO, "round_robin")
    # the inputs' own gaps are rounded to ~1e-4 s at 1e12 s; the simulated latencies are not
    # quantised to that step (they were, before times became relative to the first arrival)
    e2e = far.records["e2e_s"]
    assert np.all(np.abs(e2e / 2.0**-13 - np.round(e2e / 2.0**-13)) > 1e-6)
    np.testing.assert_allclose(e2e, base.records["e2e_s"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(far.records["arrival_s"], 1e12 + arrivals - 3.0, rtol=0, atol=1e-3)
