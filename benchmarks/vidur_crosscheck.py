"""Request-by-request cross-check of our ``vllm_v0`` mode against the real Vidur simulator.

Optional benchmark, not run in CI. Vidur lives in its own venv (it pins pandas, sklearn,
wandb, ...)::

    python3.11 -m venv /work/venv-vidur && /work/venv-vidur/bin/pip install vidur
    python benchmarks/vidur_crosscheck.py --vidur-python /work/venv-vidur/bin/python \\
        --data-dir /work/shared/data/vidur --rows 1000 --replicas 1 4 --time-scales 1 0.5

What it does, per (replicas N, arrival-time scale s):

* writes the first ``--rows`` rows of ``splitwise_conv.csv`` with arrival times x s, clipped to
  4,096 total tokens the way Vidur's trace replay clips (excess taken off the prompt), so both
  simulators serve identical token counts;
* runs Vidur 0.0.26 offline: vLLM replica scheduler, round-robin global scheduler, Llama-2-7B,
  A100, TP1, one pipeline stage, trace replay with prefill/decode/time scale factors 1,
  max_tokens 4096, default KV cache (memory planner -> 7,424 blocks) and watermark (1 %), the
  default random-forest execution-time predictor trained on the local profiles (the HF
  download of profiles/predictions is replaced by the local ``mlp.csv`` and both attention
  files concatenated); ``--rf-grid small`` shrinks its grid search (one config, 2-fold CV);
  ``Request.restart`` is patched to also reset the per-stage prefill counters (without it
  Vidur 0.0.26 dies on an assertion at the first preemption);
* runs ``python -m llm_cluster_env.replay --scenario a100x4_vllm_v0 --router round_robin``;
* prints, per metric (E2E, TTFT, scheduling delay): the means, median and p90 of the per-request
  absolute relative error |ours - vidur| / vidur, the Pearson correlation, plus the number of
  preempted requests (ours: ``preemptions > 0``; Vidur: ``request_num_restarts > 0``).

Optional extra Vidur runs, to attribute the differences: ``--also-padded`` patches Vidur's vLLM
scheduler to upstream (GitHub) Vidur's padded prefill budget ``len(batch) * max(prompt) <= 4096``,
which our ``vllm_v0`` follows (the PyPI 0.0.26 scheduler caps the *sum* of the prompts);
``--also-our-times`` replaces Vidur's execution-time predictor by our ``IterationTimeModel``
(overhead 0), so what differs then is scheduling alone; with both flags, one more run with both
patches, which is expected to match ours to float rounding.

An isolated request (one prompt alone, ``--iso-prompt``/``--iso-decode``) separates the
iteration-time models from scheduling: Vidur's prefill time (TTFT) and mean per-decode-step
time vs ours from the same replay and from ``IterationTimeModel`` (overhead 0).
Run with the project's Python (it imports ``llm_cluster_env`` for the isolated case).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MAX_TOKENS = 4096
MODEL, DEVICE, NETWORK = "meta-llama/Llama-2-7b-hf", "a100", "a100_dgx"

# Runs inside the Vidur venv: make Vidur train its predictor from local profiles (no HF hub).
_RUNNER = r"""
import os, sys
import pandas as pd
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["WANDB_MODE"] = "disabled"
from vidur.execution_time_predictor import sklearn_execution_time_predictor as sk
prof, work = sys.argv.pop(1), sys.argv.pop(1)
comp = f"{prof}/compute/a100/meta-llama/Llama-2-7b-hf"
attn = f"{work}/attention.csv"
if not os.path.exists(attn):
    parts = [pd.read_csv(f"{comp}/{f}") for f in ("attention_rows_tp1.csv", "attention_sampled.csv")
             if os.path.exists(f"{comp}/{f}")]
    pd.concat(parts, ignore_index=True).to_csv(attn, index=False)
net = f"{prof}/network/a100_dgx"
files = (f"{comp}/mlp.csv", attn, f"{net}/all_reduce.csv", f"{net}/send_recv.csv")
sk.SklearnExecutionTimePredictor._get_input_files = lambda self: files
def _offline(self):
    raise RuntimeError("offline: training the predictor from local profiles")
sk.SklearnExecutionTimePredictor._load_predictions_from_hf = _offline
# Vidur 0.0.26 bug: Request.restart() (preemption) keeps the per-stage prefill counters, so the
# recomputed prefill trips `assert num_stage_processed_tokens <= total_tokens`; reset them too.
from vidur.entities.request import Request
_restart = Request.restart
def _restart_fixed(self):
    _restart(self)
    self._num_stage_processed_tokens = 0
    self._is_prefill_stage_complete = False
Request.restart = _restart_fixed
if os.environ.get("VX_PADDED") == "1":  # upstream (GitHub) Vidur's padded prefill budget
    import inspect, textwrap
    from vidur.scheduler.replica_scheduler import vllm_replica_scheduler as vs
    src = textwrap.dedent(inspect.getsource(vs.VLLMReplicaScheduler._get_next_batch))
    old = "total_num_q_tokens + next_num_q_tokens"
    assert src.count(old) == 1, "unexpected vllm_replica_scheduler source"
    src = src.replace(old, "(len(requests) + 1) * max(num_q_tokens + [next_num_q_tokens])")
    exec(src, vs.__dict__)
    vs.VLLMReplicaScheduler._get_next_batch = vs.__dict__["_get_next_batch"]
if os.environ.get("VX_OUR_TIMES"):  # swap Vidur's predictor for our IterationTimeModel
    import importlib.util
    from vidur._native.entities import ExecutionTime
    from vidur.execution_time_predictor import base_execution_time_predictor as bp
    spec = importlib.util.spec_from_file_location("ours_latency", os.environ["VX_OUR_TIMES"])
    lat = sys.modules["ours_latency"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lat)
    model = lat.IterationTimeModel.for_replica("llama-2-7b", "a100", 1, overhead_s=0)
    def _our_time(self, batch, stage):
        qk = list(zip(batch.num_q_tokens, batch.num_kv_tokens))
        dec = [kv - 1 for q, kv in qk if q == 1]  # tokens already in the KV cache
        t = model.iteration_time(len(dec), sum(dec), [(q, kv - q) for q, kv in qk if q != 1])
        return ExecutionTime(1, 0, 0, 1e3 * t, *([0] * 11))  # total_time = ms / 1000
    bp.BaseExecutionTimePredictor.get_execution_time = _our_time
from vidur.main import main
main()
"""


def vidur_args(trace: str, out_dir: str, replicas: int, cache_dir: str, rf_grid: str) -> list[str]:
    rf = "--random_forrest_execution_time_predictor_config_"
    args = [
        "--cluster_config_num_replicas", str(replicas),
        "--replica_config_model_name", MODEL,
        "--replica_config_device", DEVICE,
        "--replica_config_network_device", NETWORK,
        "--replica_config_tensor_parallel_size", "1",
        "--replica_config_num_pipeline_stages", "1",
        "--global_scheduler_config_type", "round_robin",
        "--replica_scheduler_config_type", "vllm",
        "--request_generator_config_type", "trace_replay",
        "--trace_request_generator_config_trace_file", trace,
        "--trace_request_generator_config_max_tokens", str(MAX_TOKENS),
        "--trace_request_generator_config_prefill_scale_factor", "1",
        "--trace_request_generator_config_decode_scale_factor", "1",
        "--trace_request_generator_config_time_scale_factor", "1",
        "--execution_time_predictor_config_type", "random_forrest",
        rf + "cache_dir", cache_dir,
        rf + "prediction_max_tokens_per_request", str(MAX_TOKENS),
        "--metrics_config_output_dir", out_dir,
        "--no-metrics_config_store_plots",
        "--no-metrics_config_enable_chrome_trace",
        "--no-metrics_config_write_json_trace",
    ]
    if rf_grid == "small":
        args += [rf + "num_estimators", "250", rf + "max_depth", "32",
                 rf + "min_samples_split", "2", rf + "k_fold_cv_splits", "2"]
    return args


def check_vidur(python: str) -> str:
    try:
        res = subprocess.run([python, "-c", "import vidur, importlib.metadata as m; print(m.version('vidur'))"],
                             capture_output=True, text=True)
    except OSError as exc:
        sys.exit(f"Vidur python {python!r} cannot be run ({exc}); install Vidur in its own venv: "
                 "python3.11 -m venv /work/venv-vidur && /work/venv-vidur/bin/pip install vidur")
    if res.returncode != 0:
        sys.exit(f"Vidur is not installed for {python!r}:\n{res.stderr.strip()}\n"
                 f"install it with: {python} -m pip install vidur")
    return res.stdout.strip()


def write_traces(src: str, rows: int, scale: float, work: Path, tag: str) -> tuple[str, str]:
    """Our request CSV and Vidur's trace CSV (Time/PromptTokenCount/CompletionTokenCount/Date)."""
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        data = [row for _, row in zip(range(rows), reader)]
    ours, vidur = work / f"ours_{tag}.csv", work / f"vidur_{tag}.csv"
    with open(ours, "w", newline="") as fo, open(vidur, "w", newline="") as fv:
        wo, wv = csv.writer(fo), csv.writer(fv)
        wo.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        wv.writerow(["Time", "PromptTokenCount", "CompletionTokenCount", "Date"])
        for row in data:
            p = max(1, int(row["num_prefill_tokens"]))
            d = max(1, int(row["num_decode_tokens"]))
            p -= max(0, p + d - MAX_TOKENS)  # Vidur: excess is taken off the prompt
            t = float(row["arrived_at"]) * scale
            wo.writerow([repr(t), p, d])
            wv.writerow([repr(t), p, d, "2023-08-21"])
    return str(ours), str(vidur)


def read_columns(path: str | Path, id_col: str, columns: dict[str, str]) -> dict:
    """Per-request arrays ``{key: column}`` of a CSV, in request-id order."""
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(float(r[id_col])))
    return {key: np.array([float(r[col]) for r in rows]) for key, col in columns.items()}


def run_vidur(python: str, prof: str, trace: str, out: Path, replicas: int, work: Path, rf_grid: str,
              padded: bool = False, our_times: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-c", _RUNNER, prof, str(work)] + vidur_args(
        trace, str(out), replicas, str(work / "vidur_cache"), rf_grid)
    env = dict(os.environ, VX_PADDED="1" if padded else "0")
    if our_times:
        import llm_cluster_env.sim.latency as lat
        env["VX_OUR_TIMES"] = lat.__file__
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    if res.returncode != 0:
        sys.exit(f"Vidur failed:\n{res.stderr[-3000:]}")
    files = glob.glob(str(out / "**" / "request_metrics.csv"), recursive=True)
    if not files:
        sys.exit(f"no request_metrics.csv under {out}")
    return read_columns(max(files, key=os.path.getmtime), "Request Id", {
        "e2e": "request_e2e_time", "ttft": "prefill_e2e_time",
        "sched": "request_scheduling_delay", "restarts": "request_num_restarts"})


def run_ours(requests: str, out: Path, replicas: int) -> dict:
    cmd = [sys.executable, "-m", "llm_cluster_env.replay", "--requests", requests,
           "--scenario", "a100x4_vllm_v0", "--router", "round_robin", "--out", str(out),
           "--set", f"num_replicas={replicas}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"our replay failed:\n{res.stderr[-3000:]}")
    return read_columns(out, "request_id", {
        "e2e": "e2e_s", "ttft": "ttft_s", "sched": "scheduling_delay_s",
        "restarts": "preemptions", "replica": "replica"})


def compare(ours: dict, vidur: dict) -> list[str]:
    lines = [f"  {'metric':<8}{'ours mean':>11}{'vidur mean':>11}{'med |rel|':>10}{'p90 |rel|':>10}{'pearson':>9}"]
    for key, name in (("e2e", "E2E"), ("ttft", "TTFT"), ("sched", "sched")):
        a, b = ours[key], vidur[key]
        rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-3)  # 1 ms floor for ~0 delays
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float("nan")
        lines.append(f"  {name:<8}{a.mean():>11.3f}{b.mean():>11.3f}{np.median(rel):>10.3f}"
                     f"{np.quantile(rel, 0.9):>10.3f}{r:>9.3f}")
    lines.append(f"  preempted requests: ours {int((ours['restarts'] > 0).sum())} "
                 f"({int(ours['restarts'].sum())} preemptions), vidur {int((vidur['restarts'] > 0).sum())} "
                 f"({int(vidur['restarts'].sum())} restarts)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vidur-python", required=True, help="python of the venv where vidur is installed")
    ap.add_argument("--data-dir", default="/work/shared/data/vidur")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--time-scales", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--workdir", default="/tmp/vidur_crosscheck")
    ap.add_argument("--rf-grid", choices=["default", "small"], default="small")
    ap.add_argument("--also-padded", action="store_true",
                    help="also compare with Vidur patched to upstream's padded prefill budget")
    ap.add_argument("--also-our-times", action="store_true",
                    help="also compare with Vidur driven by our IterationTimeModel (scheduling only)")
    ap.add_argument("--iso-prompt", type=int, default=1024)
    ap.add_argument("--iso-decode", type=int, default=256)
    args = ap.parse_args()

    version = check_vidur(args.vidur_python)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    prof = str(Path(args.data_dir, "profiling").resolve())
    src = str(Path(args.data_dir, "processed_traces", "splitwise_conv.csv"))
    print(f"vidur {version}; {args.rows} rows of {src}; rf grid {args.rf_grid}")

    # Isolated request: iteration-time models only.
    iso = work / "iso.csv"
    iso.write_text(f"Time,PromptTokenCount,CompletionTokenCount,Date\n0.0,{args.iso_prompt},{args.iso_decode},2023-08-21\n")
    iso_ours = work / "iso_ours.csv"
    iso_ours.write_text(f"arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,{args.iso_prompt},{args.iso_decode}\n")
    v = run_vidur(args.vidur_python, prof, str(iso), work / "vidur_out_iso", 1, work, args.rf_grid)
    o = run_ours(str(iso_ours), work / "ours_out_iso.csv", 1)
    from llm_cluster_env.sim.latency import IterationTimeModel
    model = IterationTimeModel.for_replica("llama-2-7b", "a100", 1, overhead_s=0)
    p, d = args.iso_prompt, args.iso_decode
    m_prefill = model.iteration_time(0, 0, [(p, 0)])
    m_decode = np.mean([model.iteration_time(1, p + k) for k in range(1, d)])

    def per_dec(r: dict) -> float:
        return (r["e2e"][0] - r["ttft"][0]) / (d - 1)

    print(f"\nisolated request (prompt {p}, decode {d}): prefill/TTFT ms, mean decode step ms")
    print(f"  vidur            {1e3 * v['ttft'][0]:8.2f} {1e3 * per_dec(v):8.3f}")
    print(f"  ours (replay)    {1e3 * o['ttft'][0]:8.2f} {1e3 * per_dec(o):8.3f}")
    print(f"  ours (model)     {1e3 * m_prefill:8.2f} {1e3 * m_decode:8.3f}")

    variants = [("Vidur 0.0.26 as installed", False, False)]
    if args.also_padded:
        variants.append(("Vidur, padded budget len(batch) * max(prompt) <= 4096", True, False))
    if args.also_our_times:
        variants.append(("Vidur driven by our IterationTimeModel", False, True))
    if args.also_padded and args.also_our_times:
        variants.append(("Vidur, padded budget + our IterationTimeModel", True, True))
    for scale in args.time_scales:
        for n in args.replicas:
            tag = f"n{n}_s{scale:g}"
            ours_csv, vidur_csv = write_traces(src, args.rows, scale, work, tag)
            o = run_ours(ours_csv, work / f"ours_out_{tag}.csv", n)
            rr = bool(np.all(o["replica"] == np.arange(len(o["replica"])) % n))
            print(f"\n{n} replica(s), arrival times x {scale:g} ({len(o['e2e'])} requests; "
                  f"ours request i -> replica i mod {n}: {rr})")
            for k, (label, padded, our_times) in enumerate(variants):
                v = run_vidur(args.vidur_python, prof, vidur_csv, work / f"vidur_out{k}_{tag}", n, work,
                              args.rf_grid, padded=padded, our_times=our_times)
                assert len(o["e2e"]) == len(v["e2e"]), (len(o["e2e"]), len(v["e2e"]))
                print(f" vs {label} (max |E2E diff| {np.abs(o['e2e'] - v['e2e']).max():.3g} s):")
                print("\n".join(compare(o, v)))


if __name__ == "__main__":
    main()
