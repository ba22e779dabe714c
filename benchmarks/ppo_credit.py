"""Does PPO improve on its warm start, and which parts matter: a paired ablation.

From one warm start (``<run>/pretrained/distilled_policy.zip`` when a DAgger stage wrote one,
else ``<run>/pretrained/bc_policy.zip`` of a default ``train/warmstart.py`` job) every variant
trains the same PPO budget through the pipeline's own session (``ppo_stage.build_session`` and
``PPOTrainer``, the default config with the variant's overrides):

* ``default``: the default reward (minus the whole cluster's latency integral per step);
* ``paired``: ``ppo.paired_baseline`` = ``--baseline`` (reward minus the baseline's on a
  shadow copy of the episode, :mod:`llm_cluster_env.env.paired_reward`);
* ``paired_no_kl``: ``paired`` without the KL toward the start (``kl_ref_coef`` 0);
* ``paired_no_temp``: ``paired`` without temperature control;
* ``paired_warmup``: ``paired`` with ``--warmup-steps`` of critic warm-up (the critic alone
  learns the paired values before the actor moves, ``stabilization.critic_warmup_steps``);
* ``warmup``: the default reward with the same critic warm-up.

Each trained policy, the start policy and the ``--context`` heuristics then route the same
held-out episodes (the job's
evaluation scenarios: the family drawn with seeds ``evaluation.seed ..``, ``--eval-requests``
requests each, greedy actions); per variant the paired relative change of the mean E2E vs the
start with a 95 % bootstrap interval (:func:`llm_cluster_env.tools.paired_stats.compare_paired`;
no better/worse claim when it contains 0).

Variance: on ``--variance-episodes`` training-family episodes the start policy (sampled
actions, as in PPO's rollouts) routes with rewards paired with the baseline; per-step reward
variance and the return's std across episodes, raw vs paired, on the same steps.

Run: ``nice -n 10 python benchmarks/ppo_credit.py --run runs/<job> --steps 49152
--out runs/ppo_credit`` (JSON summary in ``<out>/ppo_credit.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from llm_cluster_env.atomic import atomic_write_json
from llm_cluster_env.env.paired_reward import PairedBaselineReward, served_env
from llm_cluster_env.routing.registry import make_any_router
from llm_cluster_env.tools.paired_stats import compare_paired
from sb3_warmstart.common.checkpoint import CheckpointManager
from sb3_warmstart.common.normalize import ReturnNormalizer
from sb3_warmstart.pipeline.config import TrainingConfig, dump_config
from sb3_warmstart.pipeline.envs import make_base_env, training_env_spec
from sb3_warmstart.pipeline.ppo_stage import PPOTrainer, build_session
from sb3_warmstart.pipeline.report import evaluate_held_out
from sb3_warmstart.pipeline.warm_start_stage import DISTILLED_POLICY, Pretrained
from sb3_warmstart.policies.policy_file import load_pretrained
from sb3_warmstart.policies.router import PolicyRouter

START = "start"
#: Variant name -> config overrides (``{baseline}`` is replaced by ``--baseline``).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "paired": {"ppo": {"paired_baseline": "{baseline}"}},
    "paired_no_kl": {"ppo": {"paired_baseline": "{baseline}"},
                     "kl": {"kl_ref_coef_initial": 0.0, "kl_ref_coef_final": 0.0}},
    "paired_no_temp": {"ppo": {"paired_baseline": "{baseline}"},
                       "temperature": {"enabled": False}},
    "paired_warmup": {"ppo": {"paired_baseline": "{baseline}"},
                      "stabilization": {"critic_warmup_steps": "{warmup}"}},
    "warmup": {"stabilization": {"critic_warmup_steps": "{warmup}"}},
}
#: The variants the benchmark trains unless ``--variants`` says otherwise.
DEFAULT_VARIANTS = ("default", "paired", "paired_no_kl", "paired_no_temp")
#: Seeds of the variance episodes (training never draws them; evaluation starts at 100000).
VARIANCE_SEED0 = 50_000


@dataclass
class Args:
    """Settings of the benchmark."""

    run: str = "runs/default"
    """run folder of a default job holding pretrained/bc_policy.zip"""
    out: str = "runs/ppo_credit"
    """output folder (one sub-folder per variant, ppo_credit.json)"""
    steps: int = 49_152
    """PPO budget per variant, env steps"""
    baseline: str = "least_added_time"
    """paired baseline router"""
    warmup_steps: int = 8192
    """critic warm-up of the ``*warmup`` variants, env steps"""
    variants: str = ",".join(DEFAULT_VARIANTS)
    """comma-separated variants to train"""
    eval_seeds: int = 10
    """held-out evaluation episodes (paired seeds)"""
    eval_requests: int = 1000
    """requests per held-out episode"""
    variance_episodes: int = 16
    """episodes of the raw-vs-paired variance measurement (0: skip it)"""
    seed: int = 0
    """PPO seed (all variants)"""
    context: str = "least_added_time,lor"
    """comma-separated heuristics also routed on the held-out episodes (the start vs each)"""


def load_start(run: Path) -> Pretrained:
    """The warm start of ``run``: the DAgger stage's distilled policy if any, else the clone."""
    folder = run / "pretrained"
    path = folder / DISTILLED_POLICY
    if not path.is_file():
        path = folder / "bc_policy.zip"
    model, meta, obs_rms = load_pretrained(path)
    returns = (ReturnNormalizer.from_dict(meta["return_normalization"])
               if meta.get("return_normalization") else None)
    return Pretrained(model.policy, obs_rms, returns, str(path), meta.get("bc_metrics", {}))


def variant_config(base: TrainingConfig, name: str, args: Args) -> TrainingConfig:
    if name not in VARIANTS:
        raise ValueError(f"variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    text = (json.dumps(VARIANTS[name]).replace("{baseline}", args.baseline)
            .replace('"{warmup}"', str(int(args.warmup_steps))))
    overrides = json.loads(text)
    return base.with_overrides({**overrides, "total_requests": args.steps, "seed": args.seed,
                                "checkpointing": {"checkpoint_interval": args.steps}})


def train_variant(config: TrainingConfig, run: Path, folder: Path) -> tuple[Any, float]:
    """One PPO run from a fresh copy of the warm start; the trained session and CPU seconds."""
    start = time.process_time()
    folder.mkdir(parents=True, exist_ok=True)
    dump_config(config, folder / "config.yaml")  # a run folder the policy loaders can read
    pretrained = load_start(run)
    session = build_session(config, pretrained)
    manager = CheckpointManager(folder / "checkpoints", config.checkpointing.max_checkpoints)
    trainer = PPOTrainer(config, session, folder, manager, resumed=False, progress=False)
    trainer.learn(config.total_requests)
    trainer.finish()
    return session, time.process_time() - start


def reward_variance(config: TrainingConfig, start: Pretrained, args: Args) -> dict[str, float]:
    """Raw vs paired rewards of the start policy (sampled actions) on the same steps."""
    env = PairedBaselineReward(make_base_env(training_env_spec(config)), args.baseline)
    router = PolicyRouter(start.policy, start.obs_rms, deterministic=False)
    raw_steps, paired_steps, raw_returns, paired_returns = [], [], [], []
    for k in range(args.variance_episodes):
        seed = VARIANCE_SEED0 + k
        obs, _ = env.reset(seed=seed)
        router.reset(served_env(env).num_replicas, np.random.default_rng(seed))
        raw, paired, done = [], [], False
        while not done:
            _, reward, terminated, truncated, info = env.step(router.select(env.view))
            raw.append(info["raw_reward"])
            paired.append(reward)
            done = terminated or truncated
        raw_steps += raw
        paired_steps += paired
        raw_returns.append(sum(raw))
        paired_returns.append(sum(paired))
    out = {"episodes": args.variance_episodes, "steps": len(raw_steps),
           "step_var_raw": float(np.var(raw_steps)), "step_var_paired": float(np.var(paired_steps)),
           "return_std_raw": float(np.std(raw_returns, ddof=1)),
           "return_std_paired": float(np.std(paired_returns, ddof=1)),
           "return_mean_raw": float(np.mean(raw_returns)),
           "return_mean_paired": float(np.mean(paired_returns))}
    out["step_var_ratio"] = out["step_var_raw"] / out["step_var_paired"]
    out["return_std_ratio"] = out["return_std_raw"] / out["return_std_paired"]
    return out


def main(args: Args) -> dict[str, Any]:
    th.set_num_threads(1)
    run, out = Path(args.run), Path(args.out)
    base = TrainingConfig()
    configs = {name: variant_config(base, name, args) for name in args.variants.split(",")}
    out.mkdir(parents=True, exist_ok=True)
    start = load_start(run)
    summary: dict[str, Any] = {"args": asdict(args), "start": start.source}
    print(f"[ppo_credit] warm start {start.source}", flush=True)
    if args.variance_episodes > 0:
        summary["variance"] = variance = reward_variance(base, start, args)
        print(f"[ppo_credit] variance over {variance['steps']} steps: per-step var raw "
              f"{variance['step_var_raw']:.4g} vs paired {variance['step_var_paired']:.4g} "
              f"({variance['step_var_ratio']:.0f}x); return std raw "
              f"{variance['return_std_raw']:.4g} vs paired {variance['return_std_paired']:.4g} "
              f"({variance['return_std_ratio']:.1f}x)", flush=True)
    routers: dict[str, Any] = {START: lambda: PolicyRouter(start.policy, start.obs_rms,
                                                           name=START)}
    summary["cpu_s"] = {}
    for name, config in configs.items():
        session, cpu = train_variant(config, run, out / name)
        summary["cpu_s"][name] = round(cpu, 1)
        print(f"[ppo_credit] trained {name}: {args.steps} steps, {cpu:.0f} CPU-s", flush=True)
        routers[name] = (lambda m=session.model, v=session.venv, n=name:
                         PolicyRouter(m, v.obs_rms, name=n))
    heuristics = [n for n in args.context.split(",") if n]
    for name in heuristics:
        routers[name] = lambda n=name: make_any_router(n)
    ev = base.evaluation
    spec = replace(base.family_config, episode_requests=args.eval_requests)
    seeds = list(range(ev.seed, ev.seed + args.eval_seeds))
    held_out = evaluate_held_out(spec, routers, seeds)
    e2e = {name: [s.results[name].episodes[0]["e2e_mean"] for s in held_out]
           for name in routers}
    summary["e2e_mean"] = e2e
    summary["vs_start"] = {}
    print(f"\n{'variant':16s} {'mean E2E s':>10s}  change vs start [95% CI]: verdict")
    print(f"{START:16s} {np.mean(e2e[START]):10.3f}")
    for name in routers:
        if name == START or name in heuristics:
            continue
        cmp = compare_paired(e2e[name], e2e[START])
        summary["vs_start"][name] = {"mean": cmp.mean, "low": cmp.low, "high": cmp.high,
                                     "seeds": cmp.seeds, "verdict": cmp.verdict}
        print(f"{name:16s} {np.mean(e2e[name]):10.3f}  {cmp}")
    summary["start_vs_heuristic"] = {}
    for name in heuristics:
        cmp = compare_paired(e2e[START], e2e[name])
        summary["start_vs_heuristic"][name] = {"mean": cmp.mean, "low": cmp.low,
                                               "high": cmp.high, "seeds": cmp.seeds,
                                               "verdict": cmp.verdict}
        print(f"{START} vs {name} ({np.mean(e2e[name]):.3f} s): {cmp}")
    atomic_write_json(out / "ppo_credit.json", summary)
    return summary


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(Args()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return Args(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
