"""The behaviour-cloning stage: demonstrations in, a cloned (Recurrent)PPO policy out.

Shared by ``train/pretrain.py`` and the warm-start pipeline, so both clone the same way:
observations normalised with statistics fitted on the demonstrations (exactly as PPO's
``VecNormalize`` will see them), the value head optionally fitted on discounted returns of the
normalised rewards, accuracy scored up to the expert's ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd

from llm_cluster_env.routing.heuristics import make_router
from sb3_warmstart.common.normalize import (
    ReturnNormalizer,
    acting_observations,
    fit_obs_normalizer,
    fit_return_normalizer,
)
from sb3_warmstart.pipeline.config import BCConfig, PPOConfig
from sb3_warmstart.policies.policy_file import build_model
from sb3_warmstart.policies.recurrent import clone_policy_class
from sb3_warmstart.policies.replica_set import SET_POLICIES, policy_class_for
from sb3_warmstart.warmstart.bc import BCEpochMetrics, RouterTies, SequenceBC


@dataclass
class CloneResult:
    """What :func:`clone_demonstrations` produced."""

    model: BaseAlgorithm  # a RecurrentPPO/PPO whose ``.policy`` is the clone
    obs_rms: RunningMeanStd | None  # None: the policy scales its inputs (replica-set policies)
    return_normalizer: ReturnNormalizer | None
    history: list[BCEpochMetrics]
    summary: dict[str, Any] = field(default_factory=dict)
    training_kwargs: dict[str, Any] = field(default_factory=dict)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)

    def metadata(self, **extra: Any) -> dict[str, Any]:
        """Checkpoint metadata: the BC metrics and history plus caller-supplied provenance."""
        return {
            "bc_metrics": {"final": self.summary, "history": [m.as_dict() for m in self.history]},
            "training_kwargs": self.training_kwargs,
            "policy_kwargs": self.policy_kwargs,
            **extra,
        }


def tie_scorer(expert: str | None, layout, sample_obs: np.ndarray) -> RouterTies | None:
    """Tie sets of ``expert`` (a router name) for tie-aware accuracy, when it defines them."""
    if expert is None:
        return None
    router = make_router(expert)
    if router.tied_choices(layout.view(sample_obs)) is None:
        return None
    return RouterTies(make_router(expert), layout)


def clone_demonstrations(
    trajectories: Sequence,
    *,
    env,
    bc: BCConfig,
    ppo: PPOConfig,
    seed: int,
    validation_fraction: float,
    value_pretraining: bool,
    expert: str | None = None,
    experts: Sequence[str] | None = None,
    init_model: BaseAlgorithm | None = None,
    init_obs_rms: RunningMeanStd | None = None,
    logger=None,
    progress: bool = False,
    action_targets: Sequence[np.ndarray | None] | None = None,
) -> CloneResult:
    """Clone ``trajectories`` into a fresh policy (or fine-tune ``init_model``'s).

    :param trajectories: imitation trajectories (with rewards for value pretraining).
    :param env: the environment (gym env) defining spaces and the observation layout.
    :param bc: BC hyperparameters.
    :param ppo: the PPO the clone is for: its architecture (``algorithm``, ``net_arch``, LSTM),
        ``gamma`` (value-pretraining returns) and ``norm_reward`` (fit the critic in
        VecNormalize-normalised reward units).
    :param seed: initial weights, split and shuffles.
    :param validation_fraction: share of whole trajectories held out.
    :param value_pretraining: also fit the critic on discounted demo returns.
    :param expert: router name whose tie sets score tie-aware accuracy.
    :param experts: one router name per trajectory instead (demonstrations of the best
        heuristic per sampled scenario).
    :param init_model: fine-tune this model's policy instead of a fresh one (external
        checkpoints); its architecture is kept.
    :param init_obs_rms: observation statistics of ``init_model`` (kept when fine-tuning, so the
        policy's inputs keep their meaning); fitted on the demos when None.
    :param logger: SB3 logger for per-epoch metrics.
    :param progress: show progress (:mod:`sb3_warmstart.pipeline.progress`).
    :param action_targets: per trajectory, a distribution over actions to learn at each step
        instead of the recorded action (``None`` entries: the action); see
        :class:`~sb3_warmstart.warmstart.bc.SequenceBC`.
    """
    layout = env.unwrapped.layout
    if init_model is not None:
        model = init_model
        policy_kwargs: dict[str, Any] = {}
    else:
        policy_kwargs = ppo.policy_kwargs(layout)
        policy = (policy_class_for(True, ppo.recurrent, ppo.recurrent_cell) if ppo.replica_set
                  else clone_policy_class(ppo.recurrent_cell) if ppo.recurrent else "MlpPolicy")
        model = build_model(policy, env.observation_space, env.action_space,
                            recurrent=ppo.recurrent, policy_kwargs=policy_kwargs, seed=seed,
                            algorithm_kwargs={"gamma": ppo.gamma})
    scaling: dict[str, float] = {}
    if isinstance(model.policy, SET_POLICIES):
        # the replica-set policies scale their inputs themselves (statistics fitted here,
        # pooled over replicas); the observations reach them raw
        obs_rms = None
        if init_model is None:
            scaling = model.policy.fit_feature_scaling(
                np.concatenate([acting_observations(t) for t in trajectories]))
    else:
        obs_rms = init_obs_rms if init_obs_rms is not None else fit_obs_normalizer(trajectories)
    value_pretraining = value_pretraining and all(
        getattr(t, "rews", None) is not None for t in trajectories)
    returns = (fit_return_normalizer(trajectories, ppo.gamma)
               if value_pretraining and ppo.norm_reward else None)
    sample = np.asarray(trajectories[0].obs)[0]
    if experts is not None:
        ties = [tie_scorer(name, layout, sample) for name in experts]
        ties = ties if all(t is not None for t in ties) else None
    else:
        ties = tie_scorer(expert, layout, sample)
    trainer = SequenceBC(policy=model.policy, trajectories=trajectories,
                         rng=np.random.default_rng(seed), obs_normalizer=obs_rms, config=bc,
                         validation_fraction=validation_fraction,
                         value_pretraining=value_pretraining, gamma=ppo.gamma,
                         return_normalizer=returns, tied_choices=ties,
                         progress=progress, logger=logger, action_targets=action_targets)
    history = trainer.train()
    final = history[-1]
    val = final.val
    summary: dict[str, Any] = {
        "trajectories": len(trajectories),
        "steps": int(sum(len(t.acts) for t in trajectories)),
        "epochs": len(history),
        "train_accuracy": final.train_accuracy,
        "val_accuracy": val.accuracy if val else float("nan"),
        "val_tie_accuracy": val.tie_accuracy if val else float("nan"),
        "val_nll": val.nll if val else float("nan"),
        "predicted_share": list(val.predicted_share) if val else None,
        "expert_share": list(val.expert_share) if val else None,
        "bc_seconds": sum(m.wall_time_s for m in history),
        "fine_tuned": init_model is not None,
        **{f"input_scaling_{k}": v for k, v in scaling.items()},
    }
    return CloneResult(model=model, obs_rms=obs_rms, return_normalizer=returns, history=history,
                       summary=summary, training_kwargs=dataclasses.asdict(bc),
                       policy_kwargs=policy_kwargs)
