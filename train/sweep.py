"""The warm-start pipeline as Ray Tune trials over seeds and a grid of hyperparameters.

Every combination of ``--seeds`` and the ``--grid`` values is one trial: the whole job of
``train/warmstart.py`` (demos -> behaviour cloning -> KL-regularised PPO -> report) in its own
run folder ``<output-dir>/<trial>/``, one CPU and one torch thread each. When all trials have
ended their final tables (the trained router against the heuristics on held-out episodes) are
gathered into one report: ``<output-dir>/sweep_report.md``, ``sweep_results.csv`` and
``sweep_results.json``, one row per trial, failed trials included with their error.

Examples::

    python train/sweep.py --seeds 0,1 --grid ppo.learning_rate=0.0001,0.0003
    python train/sweep.py --profile fast --seeds 0,1,2 --grid kl.kl_ref_coef_initial=0.5,1.0 \\
        --set total_requests=49152 --output-dir runs/sweep-kl
    python train/sweep.py --address ray://head:10001 ...     # a Ray cluster (see README)

Every trial's configuration is built and validated before Ray starts: an unknown key or a bad
value exits with status 2 naming it (``--grid ppo.learning_rat=...: ppo.learning_rat: unknown
key``). Locally Ray gets ``--num-cpus`` CPUs (default: all of this machine's) and runs as many
trials at once. Running the same command again resumes each trial's run folder (a finished
trial only re-evaluates). A repeated seed or grid value is refused (it would run a trial
twice). Needs the ``ray`` extra (``make test-ray`` builds ``.venv-ray``); without it the sweep
exits with status 2 saying so (``--dry-run`` needs no Ray).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))
DEFAULT_CONFIG = REPO_ROOT / "configs" / "warmstart.yaml"

from llm_cluster_env.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from llm_cluster_env.validation import ConfigError, deep_merge  # noqa: E402

#: Columns of the sweep table (from each trial's report summary), in order.
RESULT_COLUMNS = ("ppo_e2e_mean", "lor_e2e_mean", "ppo_vs_lor", "ppo_p99_vs_lor",
                  "best_heuristic", "ppo_vs_best_heuristic", "ppo_balance", "ppo_env_steps",
                  "wall_s")


@dataclass(frozen=True)
class Trial:
    """One trial: its name (also its run folder's), the overrides it applies over the base
    configuration, and the configuration they give (built and validated once, here)."""

    name: str
    overrides: dict[str, Any]
    config: Any  # sb3_warmstart.pipeline.config.TrainingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file keyed by env id (default: configs/warmstart.yaml)")
    p.add_argument("--profile", default="default", help="profile of --config every trial uses")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a dotted config key and its values (each parsed as YAML; a YAML list "
                   "'[...]' for values holding commas); trials are every combination")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every trial (value parsed as YAML)")
    p.add_argument("--output-dir", default="runs/sweep", help="the sweep folder: one run "
                   "folder per trial, Ray Tune's records and the sweep report")
    p.add_argument("--address", help="a running Ray cluster (e.g. ray://head:10001 or "
                   "head:6379); default: a local Ray with --num-cpus CPUs. On a cluster "
                   "--output-dir must be a path every node can write (shared storage)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPUs Ray reserves per trial (default 1: as many trials at once as "
                   "CPUs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and list the trials, then exit without starting Ray")
    return p


def parse_value(text: str) -> Any:
    """A YAML scalar; a string that reads as a number is that number (YAML 1.1 reads
    ``1e-4`` as a string)."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(items: list[str], seeds_text: str) -> list[tuple[str, list[Any]]]:
    """``[(dotted key, values), ...]`` with ``seed`` first; raises :class:`ConfigError`
    naming the flag and text of a malformed item."""
    import yaml

    try:
        seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={seeds_text!r}: expected comma-separated integers") from None
    if not seeds:
        raise ConfigError(f"--seeds={seeds_text!r}: no seed")
    repeated = _first_repeat(seeds)
    if repeated is not None:
        raise ConfigError(f"--seeds={seeds_text!r}: seed {repeated!r} repeated (it would run "
                          "the same trial twice)")
    axes: list[tuple[str, list[Any]]] = [("seed", seeds)]
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key == "seed" or any(key == k for k, _ in axes):
            raise ConfigError(f"--grid {item!r}: {key} is already an axis of the sweep"
                              + (" (use --seeds)" if key == "seed" else ""))
        if text.lstrip().startswith("["):
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ConfigError(f"--grid {item!r}: not a valid YAML list: {err}") from None
            values = [parse_value(v) if isinstance(v, str) else v for v in values]
        else:
            values = [parse_value(v) for v in text.split(",")]
        if not values:
            raise ConfigError(f"--grid {item!r}: no value")
        repeated = _first_repeat(values)
        if repeated is not None:
            raise ConfigError(f"--grid {item!r}: {key}={repeated!r} repeated (it would run the "
                              "same trials twice)")
        axes.append((key, values))
    return axes


def _first_repeat(values: list[Any]) -> Any:
    """The first value equal to an earlier one (``1e-4`` and ``0.0001`` are equal), else
    ``None``."""
    for i, value in enumerate(values):
        if any(value == earlier for earlier in values[:i]):
            return value
    return None


#: What to run when Ray Tune cannot be imported.
RAY_INSTALL = ("the ray extra: `make test-ray` builds .venv-ray with it, or pip install -e "
               "'.[ray]' and imitation==1.0.0 --no-deps in a venv of its own (see the Makefile)")


def require_ray() -> None:
    """Raise :class:`ConfigError` naming the ``ray`` extra and how to install it when Ray
    Tune cannot be imported."""
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"Ray Tune is not installed ({err}): the sweep needs "
                          f"{RAY_INSTALL}") from None


def _dotted(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    target = out
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value
    return out


def _label(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)[:40]


def build_trials(config_path: str | Path | None, profile: str, axes: list[tuple[str, list[Any]]],
                 common: dict[str, Any]) -> list[Trial]:
    """Every combination of the axes as a validated :class:`Trial`.

    :raises ConfigError: naming the grid key (or ``--set`` key) and value that fail, before
        anything runs.
    """
    from sb3_warmstart.pipeline.config import load_config

    keys = [k for k, _ in axes]
    trials = []
    for index, combo in enumerate(itertools.product(*(v for _, v in axes))):
        overrides = dict(common)
        for key, value in zip(keys, combo):
            overrides = deep_merge(overrides, _dotted(key, value))
        try:
            config = load_config(config_path, profile, overrides)
        except ConfigError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
            raise ConfigError(f"trial {index} ({where}): {err}") from None
        name = f"trial-{index:02d}-" + "-".join(
            f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, combo))
        trials.append(Trial(name, {k: v for k, v in zip(keys, combo)}, config))
    return trials


def run_trial(trial: Trial, run_dir: str) -> dict[str, Any]:
    """One trial's whole pipeline in ``run_dir``; returns the row of the sweep table, the
    trial's results table and its start and end times (for the concurrency check)."""
    import torch as th

    from sb3_warmstart.pipeline.runner import RunOptions, WarmStartPipeline

    th.set_num_threads(1)
    start = time.time()
    options = RunOptions(output_dir=Path(run_dir), output_dir_given=True, resume="checkpoint",
                         progress=False, command=["train/sweep.py", trial.name])
    summary = WarmStartPipeline(trial.config, options).run()
    end = time.time()
    return {"trial": trial.name, **result_row(summary),
            "ppo_env_steps": trial.config.total_requests, "wall_s": round(end - start, 1),
            "start_time": start, "end_time": end, "table": summary.get("table", ""),
            "run_dir": str(run_dir)}


def result_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The sweep table's columns from a pipeline report summary (one builder for one-scenario
    and family runs: ``scenarios`` holds one row per held-out scenario, a single row for a
    one-scenario run): E2E and balance averaged over the scenarios, the relative columns from
    the report's ``comparison`` (geometric means over the scenarios, each against its own best
    heuristic, whose names are listed)."""
    scenarios = [s for s in summary.get("scenarios", []) if "ppo" in s]
    comparison = summary.get("comparison", {})

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return float(sum(values) / len(values)) if values else None

    return {"ppo_e2e_mean": mean([s["ppo"]["e2e"] for s in scenarios]),
            "lor_e2e_mean": mean([s.get("lor_e2e") for s in scenarios]),
            "ppo_vs_lor": comparison.get("ppo_vs_lor"),
            "ppo_p99_vs_lor": comparison.get("ppo_p99_vs_lor"),
            "best_heuristic": comparison.get("best_heuristic"),
            "ppo_vs_best_heuristic": comparison.get("ppo_vs_best_heuristic"),
            "ppo_balance": mean([s["ppo"].get("balance") for s in scenarios])}


def max_concurrency(rows: list[dict[str, Any]]) -> int:
    """The largest number of trials that were running at the same instant."""
    events = sorted([(r["start_time"], 1) for r in rows if r.get("start_time") is not None]
                    + [(r["end_time"], -1) for r in rows if r.get("end_time") is not None],
                    key=lambda e: (e[0], e[1]))
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


REPORT_FILES = ("sweep_report.md", "sweep_results.csv", "sweep_results.json")


def keep_earlier_report(folder: Path, trial_names: list[str]) -> Path | None:
    """Move an earlier sweep's report files aside to ``previous-<time>/`` when they list other
    trials (a rerun of the same sweep updates its report in place); returns where."""
    earlier = folder / "sweep_results.json"
    if not earlier.is_file():
        return None
    try:
        listed = [r["trial"] for r in json.loads(earlier.read_text())["trials"]]
    except (ValueError, KeyError, TypeError):
        listed = None
    if listed == trial_names:
        return None
    target = folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        if (folder / name).exists():
            (folder / name).rename(target / name)
    return target


def write_report(folder: Path, trials: list[Trial], rows: dict[str, dict[str, Any]]) -> dict:
    """``sweep_report.md``, ``sweep_results.csv`` and ``sweep_results.json`` in ``folder``:
    one row per trial (``status`` ok or the error), then each trial's final table. An earlier
    report of other trials is moved aside first (:func:`keep_earlier_report`)."""
    moved = keep_earlier_report(folder, [t.name for t in trials])
    if moved is not None:
        print(f"[sweep] the earlier sweep's report (other trials) moved to {moved}", flush=True)
    axes = list(trials[0].overrides) if trials else []
    records = []
    for trial in trials:
        row = rows.get(trial.name, {"status": "no result (the trial did not report)"})
        records.append({"trial": trial.name, **trial.overrides,
                        "status": row.get("status", "ok"),
                        **{c: row.get(c) for c in RESULT_COLUMNS},
                        "run_dir": row.get("run_dir", str(folder / trial.name))})
    finished = [rows[t.name] for t in trials if rows.get(t.name, {}).get("status", "ok") == "ok"
                and t.name in rows]
    summary = {"trials": records, "max_concurrent_trials": max_concurrency(finished),
               "finished": len(finished), "total": len(trials)}
    atomic_write_json(folder / "sweep_results.json", summary)
    header = ["trial", *axes, "status", *RESULT_COLUMNS]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    for r in records:
        writer.writerow([_fmt(r.get(h)) for h in header])
    atomic_write_text(folder / "sweep_results.csv", text.getvalue())
    lines = [f"# Sweep: {len(finished)} of {len(trials)} trials finished", "",
             f"At most {summary['max_concurrent_trials']} trials ran at the same time. "
             "Relative columns are PPO's mean (or p99) E2E over lor's (or the best "
             "heuristic's) minus 1, on each trial's held-out episodes (trained across a "
             "scenario family: E2E and balance averaged over the held-out scenarios, the "
             "relative columns geometric means over them, each scenario against its best "
             "heuristic).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r.get(h)) for h in header) + " |" for r in records]
    for trial in trials:
        row = rows.get(trial.name, {})
        lines += ["", f"## {trial.name}", ""]
        if row.get("table"):
            lines += ["```", row["table"], "```"]
        else:
            lines.append(f"{row.get('status', 'no result')}")
    atomic_write_text(folder / "sweep_report.md", "\n".join(lines) + "\n")
    return summary


def run_sweep(trials: list[Trial], output_dir: Path, *, address: str | None = None,
              num_cpus: int | None = None, cpus_per_trial: float = 1.0) -> dict[str, Any]:
    """Run ``trials`` as Ray Tune trials (local Ray unless ``address``); write and return the
    sweep report."""
    import ray
    from ray import tune

    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    env_vars = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars})
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env_vars})
    by_name = {t.name: t for t in trials}

    def trainable(params: dict[str, Any]) -> None:
        trial = by_name[params["trial"]]
        try:
            row = run_trial(trial, str(output_dir / trial.name))
            row["status"] = "ok"
        except BaseException as err:  # the report lists it; other trials go on
            row = {"trial": trial.name, "status": f"error: {type(err).__name__}: {err}"}
        tune.report({k: v for k, v in row.items()})

    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial}),
            param_space={"trial": tune.grid_search([t.name for t in trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=len(trials)),
            run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(output_dir), verbose=1),
        )
        grid = tuner.fit()
        rows: dict[str, dict[str, Any]] = {}
        for result in grid:
            metrics = result.metrics or {}
            name = (result.config or {}).get("trial")
            if name is None:
                continue
            if result.error is not None and "status" not in metrics:
                metrics = {"trial": name, "status": f"error: {result.error}"}
            rows[name] = metrics
    finally:
        ray.shutdown()
    return write_report(output_dir, trials, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpus_per_trial <= 0:
        parser.error(f"--cpus-per-trial={args.cpus_per_trial}: must be > 0")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error(f"--num-cpus={args.num_cpus}: must be >= 1")
    if args.address and args.num_cpus is not None:
        parser.error("--num-cpus: only for a local Ray (a cluster has its own CPUs)")
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        common: dict[str, Any] = {}
        for item in args.set:
            key, sep, text = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            common = deep_merge(common, _dotted(key, parse_value(text)))
        trials = build_trials(config_path, args.profile, parse_grid(args.grid, args.seeds),
                              common)
    except ConfigError as err:
        parser.error(str(err))
    print(f"[sweep] {len(trials)} trials:", flush=True)
    for trial in trials:
        print(f"  {trial.name}", flush=True)
    if args.dry_run:
        return {"trials": [t.name for t in trials]}
    try:
        require_ray()
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = run_sweep(trials, Path(args.output_dir), address=args.address,
                        num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial)
    out = Path(args.output_dir)
    print(f"[sweep] {summary['finished']} of {summary['total']} trials finished, at most "
          f"{summary['max_concurrent_trials']} at once; report: {out / 'sweep_report.md'}",
          flush=True)
    print((out / "sweep_report.md").read_text().split("\n## ")[0], flush=True)
    return summary


if __name__ == "__main__":
    main()
