"""Training speed of recurrent PPO: sb3-contrib's minibatches against sequences padded once per
rollout, LSTM and GRU, next to feed-forward PPO; gradient checkpointing; the main job's PPO stage.

Three parts, each measured in one run with the variants alternated (the machine is shared: the
ratios, not the absolute figures, are what a run can compare). Speed is env steps per CPU-second
(``time.process_time``, the whole ``learn()``: collecting rollouts and training), one torch
thread.

``--speed`` (default): the issue's configuration -- ``LLMCluster-v0``, 4 envs, 512-request
episodes, ``n_steps`` 256, ``batch_size`` 256, 4 epochs; 64-unit recurrent cells and ``net_arch``
[64, 64] (the main job's architecture) -- on 4 replicas (``a100x4_conv_70``) and 16
(``a100x16``, 512-request episodes). Variants: sb3-contrib ``RecurrentPPO`` (``MlpLstmPolicy``),
our ``KLRecurrentPPO`` with the extras off on sb3-contrib's minibatches and with sequence
batching (``sequence_length`` 32; LSTM, GRU, and LSTM with the main job's KL terms and a
reference), SB3 ``PPO`` and our ``KLPPO``; and the replica-set recurrent policy (LSTM on
sb3-contrib's minibatches, LSTM and GRU with sequence batching). Each run is a fresh model
learning ``--steps`` env steps; the best (least CPU) of ``--rounds`` runs is kept. Printed: env
steps per CPU-second, the ratio to stock ``RecurrentPPO``, and the CPU split between ``train()``
and collecting rollouts.

``--checkpointing``: the same model trained with and without
``gradient_optimization.use_gradient_checkpointing`` (identical updates, tested): CPU seconds
of ``train()`` and the bytes of activations each minibatch's forward pass keeps until its
backward pass (the tensors autograd saves, counted with
``torch.autograd.graph.saved_tensors_hooks``; under the checkpoint only its inputs, the
minibatch the buffer holds anyway, are kept). The whole forward pass is one checkpointed
segment and each minibatch's backward pass follows its forward pass, so the recomputation
in the backward pass saves the same activations again: the peak within one minibatch is not
lowered, only what is held between the forward and the backward pass.

``--main-job``: ``train/warmstart.py``'s default configuration (the generalist: demos, BC,
PPO across the scenario family, evaluation on held-out scenarios) with the recurrent
replica-set policy (``ppo.algorithm: recurrent_ppo``; the default job is feed-forward), per
seed, PPO with ``ppo.sequence_length: null`` (sb3-contrib's minibatches, before) and the
default (after): the PPO stage's wall time and CPU time, the final mean E2E vs ``lor`` and the
last quarter of the paired training curve vs ``lor`` (where the report has one).

Usage::

    python -m benchmarks.train_speed [--speed] [--checkpointing] [--main-job]
        [--steps 8192] [--rounds 2] [--replicas 4 16] [--seeds 0 1 2]
        [--output-dir runs/bench_train_speed]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

import llm_cluster_env  # noqa: F401  (registers LLMCluster-v0)
from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO
from sb3_warmstart.pipeline.config import (
    AdvancedOptimizationConfig,
    GradientOptimizationConfig,
    KLConfig,
    PPOConfig,
    load_config,
)
from sb3_warmstart.policies.replica_set import (
    RecurrentReplicaSetGruPolicy,
    RecurrentReplicaSetPolicy,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The issue's configuration.
N_ENVS, N_STEPS, BATCH_SIZE, N_EPOCHS, EPISODE_REQUESTS = 4, 256, 256, 4, 512
SEQUENCE_LENGTH = 32
SCENARIOS = {4: "a100x4_conv_70", 16: "a100x16"}
MLP = {"net_arch": [64, 64]}
RECURRENT = {"net_arch": [64, 64], "lstm_hidden_size": 64}
SET = {"lstm_hidden_size": 64, "embed_dim": 64, "hidden_dim": 64}


def make_venv(replicas: int) -> DummyVecEnv:
    return DummyVecEnv([partial(gym.make, "LLMCluster-v0", scenario=SCENARIOS[replicas],
                                episode_requests=EPISODE_REQUESTS)] * N_ENVS)


def set_policy_kwargs(venv: DummyVecEnv) -> dict[str, Any]:
    """The replica-set policies' kwargs, as ``PPOConfig.policy_kwargs`` builds them."""
    config = PPOConfig(algorithm="recurrent_ppo", policy="replica_set",
                       lstm_hidden_size=SET["lstm_hidden_size"], set_embed_dim=SET["embed_dim"],
                       set_hidden_dim=SET["hidden_dim"])
    return config.policy_kwargs(venv.envs[0].unwrapped.layout)


def _common(seed: int) -> dict[str, Any]:
    return dict(n_steps=N_STEPS, batch_size=BATCH_SIZE, n_epochs=N_EPOCHS, seed=seed,
                device="cpu")


def _kl_extras_on(model: KLRecurrentPPO) -> KLRecurrentPPO:
    model.set_reference_policy(model.policy)
    return model


#: name -> builder(venv, seed) of the speed table's variants, in table order. ``stock`` marks
#: the ratio's denominator.
VARIANTS: dict[str, Callable[[DummyVecEnv, int], Any]] = {
    "sb3-contrib RecurrentPPO (MlpLstmPolicy)": lambda venv, seed: RecurrentPPO(
        "MlpLstmPolicy", venv, policy_kwargs=RECURRENT, **_common(seed)),
    "KLRecurrentPPO, extras off, sb3-contrib minibatches": lambda venv, seed: KLRecurrentPPO(
        "TemperatureMlpLstmPolicy", venv, policy_kwargs=RECURRENT, sequence_length=None,
        **_common(seed)),
    "KLRecurrentPPO, extras off, sequence batching, LSTM": lambda venv, seed: KLRecurrentPPO(
        "TemperatureMlpLstmPolicy", venv, policy_kwargs=RECURRENT,
        sequence_length=SEQUENCE_LENGTH, **_common(seed)),
    "KLRecurrentPPO, extras off, sequence batching, GRU": lambda venv, seed: KLRecurrentPPO(
        "TemperatureMlpGruPolicy", venv, policy_kwargs=RECURRENT,
        sequence_length=SEQUENCE_LENGTH, **_common(seed)),
    "KLRecurrentPPO, main job's KL terms, sequence batching, LSTM": lambda venv, seed:
        _kl_extras_on(KLRecurrentPPO("TemperatureMlpLstmPolicy", venv, policy_kwargs=RECURRENT,
                                     sequence_length=SEQUENCE_LENGTH, kl=KLConfig(),
                                     **_common(seed))),
    "SB3 PPO (MlpPolicy)": lambda venv, seed: PPO("MlpPolicy", venv, policy_kwargs=MLP,
                                                  **_common(seed)),
    "KLPPO, extras off": lambda venv, seed: KLPPO("TemperatureMlpPolicy", venv,
                                                  policy_kwargs=MLP, **_common(seed)),
    "replica-set LSTM, sb3-contrib minibatches": lambda venv, seed: KLRecurrentPPO(
        RecurrentReplicaSetPolicy, venv, policy_kwargs=set_policy_kwargs(venv),
        sequence_length=None, **_common(seed)),
    "replica-set LSTM, sequence batching": lambda venv, seed: KLRecurrentPPO(
        RecurrentReplicaSetPolicy, venv, policy_kwargs=set_policy_kwargs(venv),
        sequence_length=SEQUENCE_LENGTH, **_common(seed)),
    "replica-set GRU, sequence batching": lambda venv, seed: KLRecurrentPPO(
        RecurrentReplicaSetGruPolicy, venv, policy_kwargs=set_policy_kwargs(venv),
        sequence_length=SEQUENCE_LENGTH, **_common(seed)),
}
STOCK = "sb3-contrib RecurrentPPO (MlpLstmPolicy)"


@dataclass
class Timing:
    """CPU seconds of one ``learn()``: the total and the part spent in ``train()``."""

    steps: int
    total_s: float
    train_s: float

    @property
    def steps_per_cpu_s(self) -> float:
        return self.steps / self.total_s


def timed_learn(model, steps: int) -> Timing:
    """``model.learn(steps)`` timed in CPU seconds, with ``train()`` timed apart."""
    spent = [0.0]
    train = model.train

    def timed_train() -> None:
        start = time.process_time()
        train()
        spent[0] += time.process_time() - start

    model.train = timed_train
    start = time.process_time()
    model.learn(steps)
    total = time.process_time() - start
    model.train = train
    return Timing(steps=steps, total_s=total, train_s=spent[0])


@dataclass
class SpeedRow:
    name: str
    replicas: int
    runs: list[Timing] = field(default_factory=list)

    @property
    def best(self) -> Timing:
        return min(self.runs, key=lambda t: t.total_s)


def speed_table(replica_counts: list[int], steps: int, rounds: int) -> list[SpeedRow]:
    """Every variant on every replica count, ``rounds`` times, alternated."""
    rows = {(n, name): SpeedRow(name, n) for n in replica_counts for name in VARIANTS}
    for r in range(rounds):
        for n in replica_counts:
            for name, build in VARIANTS.items():
                venv = make_venv(n)
                model = build(venv, r)
                timing = timed_learn(model, steps)
                rows[(n, name)].runs.append(timing)
                print(f"  round {r + 1}/{rounds}, {n} replicas, {name}: "
                      f"{timing.steps_per_cpu_s:,.0f} steps/CPU-s (train {timing.train_s:.1f} "
                      f"of {timing.total_s:.1f} CPU-s)", flush=True)
    return list(rows.values())


def print_speed(rows: list[SpeedRow], steps: int) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r.replicas for r in rows}):
        stock = next(r for r in rows if r.replicas == n and r.name == STOCK).best
        print(f"\n{n} replicas ({SCENARIOS[n]}, {EPISODE_REQUESTS}-request episodes), "
              f"{steps:,} env steps per run, best of {len(rows[0].runs)}:")
        print(f"| algorithm | env steps per CPU-second | vs stock RecurrentPPO | "
              f"train() CPU-s per {steps:,} steps | collecting CPU-s |")
        print("|---|---|---|---|---|")
        for row in (r for r in rows if r.replicas == n):
            t = row.best
            print(f"| {row.name} | {t.steps_per_cpu_s:,.0f} | "
                  f"{t.steps_per_cpu_s / stock.steps_per_cpu_s:.2f}x | {t.train_s:.1f} | "
                  f"{t.total_s - t.train_s:.1f} |")
            out.append({"replicas": n, "algorithm": row.name,
                        "steps_per_cpu_s": t.steps_per_cpu_s,
                        "vs_stock": t.steps_per_cpu_s / stock.steps_per_cpu_s,
                        "train_cpu_s": t.train_s, "collect_cpu_s": t.total_s - t.train_s,
                        "runs_cpu_s": [x.total_s for x in row.runs]})
    return out


# ----------------------------------------------------------------------------- checkpointing
def saved_bytes_hook(model) -> list[int]:
    """Record, per minibatch, the bytes of the tensors its forward pass saves for backward."""
    sizes: list[int] = []
    forward = model._forward_minibatch

    def counted(*args, **kwargs):
        storages: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with th.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            result = forward(*args, **kwargs)
        sizes.append(sum(storages.values()))
        return result

    model._forward_minibatch = counted
    return sizes


def checkpointing_trade(replica_counts: list[int], steps: int, rounds: int
                        ) -> list[dict[str, Any]]:
    """Sequence-batched LSTM (main job's KL terms on) with and without checkpointing."""
    results = []
    for n in replica_counts:
        for label, policy, kwargs in (("LSTM, sequence batching", "TemperatureMlpLstmPolicy",
                                       RECURRENT),
                                      ("replica-set LSTM, sequence batching",
                                       RecurrentReplicaSetPolicy, None)):
            runs: dict[bool, list[tuple[Timing, float]]] = {False: [], True: []}
            for _ in range(rounds):
                for on in (False, True):
                    venv = make_venv(n)
                    optimization = AdvancedOptimizationConfig(
                        gradient_optimization=GradientOptimizationConfig(
                            use_gradient_checkpointing=on))
                    model = _kl_extras_on(KLRecurrentPPO(
                        policy, venv, policy_kwargs=kwargs or set_policy_kwargs(venv),
                        sequence_length=SEQUENCE_LENGTH, kl=KLConfig(),
                        optimization=optimization, **_common(0)))
                    sizes = saved_bytes_hook(model)
                    timing = timed_learn(model, steps)
                    runs[on].append((timing, float(np.mean(sizes))))
            best = {on: min(v, key=lambda x: x[0].train_s) for on, v in runs.items()}
            off_t, off_b = best[False]
            on_t, on_b = best[True]
            row = {"replicas": n, "policy": label,
                   "train_cpu_s_off": off_t.train_s, "train_cpu_s_on": on_t.train_s,
                   "saved_mib_per_minibatch_off": off_b / 2**20,
                   "saved_mib_per_minibatch_on": on_b / 2**20}
            results.append(row)
            print(f"{n} replicas, {label}: train() {off_t.train_s:.2f} -> {on_t.train_s:.2f} "
                  f"CPU-s per {steps:,} steps ({on_t.train_s / off_t.train_s:.2f}x); activations "
                  f"kept from forward to backward {off_b / 2**20:.2f} -> {on_b / 2**20:.2f} MiB "
                  f"per minibatch", flush=True)
    return results


# ----------------------------------------------------------------------------- main job
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def final_vs_lor(summary: dict[str, Any]) -> float:
    """The trained policy's final mean E2E vs ``lor`` from a run's report summary: one
    scenario's comparison, or a family's mean over its held-out scenarios."""
    if "comparison" in summary:
        return summary["comparison"]["ppo_vs_lor"]
    return summary["ppo"]["vs_lor_mean"]


def main_job(seeds: list[int], output_dir: Path, requests: int | None) -> list[dict[str, Any]]:
    """The default main job with the recurrent replica-set policy (``ppo.algorithm:
    recurrent_ppo``) per seed, PPO before (sb3-contrib minibatches) and after."""
    from sb3_warmstart.pipeline import ppo_stage
    from sb3_warmstart.pipeline.runner import RunOptions, WarmStartPipeline

    learn = ppo_stage.PPOTrainer.learn
    cpu = [0.0]

    def timed(self, steps):
        start = time.process_time()
        try:
            return learn(self, steps)
        finally:
            cpu[0] += time.process_time() - start

    ppo_stage.PPOTrainer.learn = timed
    variants = {"before (sequence_length: null)": None, "after (default)": "default"}
    results = []
    try:
        for i, seed in enumerate(seeds):
            order = list(variants.items())
            for label, value in (order if i % 2 == 0 else order[::-1]):
                overrides: dict[str, Any] = {"seed": seed, "ppo": {"algorithm": "recurrent_ppo"}}
                if value is None:
                    overrides["ppo"]["sequence_length"] = None
                if requests is not None:
                    overrides["total_requests"] = requests
                config = load_config(overrides=overrides)
                out = output_dir / f"main_job_seed{seed}_{'before' if value is None else 'after'}"
                cpu[0] = 0.0
                pipeline = WarmStartPipeline(config, RunOptions(
                    output_dir=out, progress=False, resume="warmstart",
                    command=["benchmarks/train_speed.py", "--main-job"]))
                summary = pipeline.run()
                row = {"seed": seed, "variant": label,
                       "sequence_length": config.ppo.sequence_length,
                       "ppo_wall_s": pipeline.timings.get("ppo_s"), "ppo_cpu_s": cpu[0],
                       "eval_vs_lor": final_vs_lor(summary),
                       "training_last_quarter_vs_lor_pct": summary.get(
                           "last_quarter_vs_lor_pct")}
                results.append(row)
                print(f"  seed {seed}, {label}: PPO {row['ppo_wall_s']:.0f} s wall, "
                      f"{row['ppo_cpu_s']:.0f} CPU-s; final eval vs lor "
                      f"{100 * row['eval_vs_lor']:+.2f}%, training last quarter "
                      f"{_pct(row['training_last_quarter_vs_lor_pct'])}", flush=True)
    finally:
        ppo_stage.PPOTrainer.learn = learn
    print("\n| seed | variant | PPO wall s | PPO CPU s | final E2E vs lor | training, last "
          "quarter vs lor |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {r['variant']} | {r['ppo_wall_s']:.0f} | {r['ppo_cpu_s']:.0f} | "
              f"{100 * r['eval_vs_lor']:+.2f}% | {_pct(r['training_last_quarter_vs_lor_pct'])} |")
    for label in variants:
        rows = [r for r in results if r["variant"] == label]
        print(f"{label}: mean PPO wall {np.mean([r['ppo_wall_s'] for r in rows]):.0f} s, CPU "
              f"{np.mean([r['ppo_cpu_s'] for r in rows]):.0f} s; final E2E vs lor "
              f"{100 * np.mean([r['eval_vs_lor'] for r in rows]):+.2f}% (per seed "
              + ", ".join(f"{100 * r['eval_vs_lor']:+.2f}%" for r in rows) + ")")
    before = [r for r in results if r["sequence_length"] is None]
    after = [r for r in results if r["sequence_length"] is not None]
    print(f"PPO stage speed-up (mean over seeds): wall "
          f"{np.mean([r['ppo_wall_s'] for r in before]) / np.mean([r['ppo_wall_s'] for r in after]):.2f}x"
          f", CPU {np.mean([r['ppo_cpu_s'] for r in before]) / np.mean([r['ppo_cpu_s'] for r in after]):.2f}x")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="the speed table (default)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing's memory/time trade")
    parser.add_argument("--main-job", action="store_true",
                        help="the main job's PPO stage before/after, per seed")
    parser.add_argument("--steps", type=int, default=8192, help="env steps per speed run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant (best kept)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 16],
                        choices=sorted(SCENARIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="main-job seeds")
    parser.add_argument("--main-job-requests", type=int, default=None,
                        help="PPO budget of the main job (default: the config's 98,304)")
    parser.add_argument("--output-dir", default="runs/bench_train_speed")
    args = parser.parse_args(argv)
    if not (args.speed or args.checkpointing or args.main_job):
        args.speed = True
    th.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": {
        "n_envs": N_ENVS, "n_steps": N_STEPS, "batch_size": BATCH_SIZE, "n_epochs": N_EPOCHS,
        "episode_requests": EPISODE_REQUESTS, "sequence_length": SEQUENCE_LENGTH,
        "steps_per_run": args.steps, "rounds": args.rounds, "torch_threads": 1}}
    if args.speed:
        print("speed table:", flush=True)
        results["speed"] = print_speed(speed_table(args.replicas, args.steps, args.rounds),
                                       args.steps)
    if args.checkpointing:
        print("\ngradient checkpointing:", flush=True)
        results["checkpointing"] = checkpointing_trade(args.replicas, args.steps, args.rounds)
    if args.main_job:
        print("\nmain job:", flush=True)
        results["main_job"] = main_job(args.seeds, out, args.main_job_requests)
    name = "summary_" + "_".join(k for k in ("speed", "checkpointing", "main_job")
                                 if getattr(args, k)) + ".json"
    atomic_write_json(out / name, results)
    print(f"\nwrote {out / name}")


if __name__ == "__main__":
    main()
