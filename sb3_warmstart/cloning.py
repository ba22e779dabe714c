"""The behaviour-cloning stage: demonstrations in, a cloned (Recurrent)PPO policy out.

Shared by ``train/pretrain.py`` and the warm-start pipeline, so both clone the same way:
observations normalised with statistics fitted on the demonstrations (exactly as PPO's
``VecNormalize`` will see them), the value head optionally fitted on discounted returns of the
normalised rewards, accuracy scored up to the expert's ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd

from llm_cluster_env.routers import make_router
from sb3_warmstart.bc import (
    PRESETS,
    BCEpochMetrics,
    BCPreset,
    ReturnNormalizer,
    RouterTies,
    SequenceBC,
    fit_obs_normalizer,
    fit_return_normalizer,
)
from sb3_warmstart.policy_io import build_model

BC_OVERRIDES = ("epochs", "batch_size", "learning_rate", "sequence_length")


@dataclass
class CloneResult:
    """What :func:`clone_demonstrations` produced."""

    model: BaseAlgorithm  # a RecurrentPPO/PPO whose ``.policy`` is the clone
    obs_rms: RunningMeanStd
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
    preset: str | BCPreset = "standard",
    recurrent: bool = True,
    seed: int = 0,
    gamma: float = 0.99,
    overrides: Mapping[str, Any] | None = None,
    validation_fraction: float = 0.2,
    value_pretraining: bool = True,
    norm_reward: bool = True,
    expert: str | None = None,
    init_model: BaseAlgorithm | None = None,
    init_obs_rms: RunningMeanStd | None = None,
    logger=None,
    progress: bool = False,
) -> CloneResult:
    """Clone ``trajectories`` into a fresh policy (or fine-tune ``init_model``'s).

    :param trajectories: imitation trajectories (with rewards for value pretraining).
    :param env: the environment (gym env) defining spaces and the observation layout.
    :param preset: a :data:`~sb3_warmstart.bc.PRESETS` name or a :class:`BCPreset`.
    :param recurrent: clone into ``MlpLstmPolicy`` (RecurrentPPO) rather than ``MlpPolicy``.
    :param seed: initial weights, split and shuffles.
    :param gamma: discount of the value-pretraining returns (PPO's gamma).
    :param overrides: replace preset values: ``epochs``, ``batch_size``, ``learning_rate``,
        ``sequence_length`` (``None`` values are ignored).
    :param validation_fraction: share of whole trajectories held out.
    :param value_pretraining: also fit the critic on discounted demo returns.
    :param norm_reward: fit the critic in VecNormalize-normalised reward units.
    :param expert: router name whose tie sets score tie-aware accuracy.
    :param init_model: fine-tune this model's policy instead of a fresh one (external
        checkpoints); its architecture is kept.
    :param init_obs_rms: observation statistics of ``init_model`` (kept when fine-tuning, so the
        policy's inputs keep their meaning); fitted on the demos when None.
    :param logger: SB3 logger for per-epoch metrics.
    :param progress: tqdm bar and per-epoch lines.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    training = preset.training_kwargs()
    for key, value in (overrides or {}).items():
        if key not in BC_OVERRIDES:
            raise ValueError(f"overrides: unknown BC setting {key!r} (known: {BC_OVERRIDES})")
        if value is not None:
            training[key] = value
    if training["lr_schedule"] == "cosine":
        training["min_learning_rate"] = min(training["min_learning_rate"],
                                            training["learning_rate"])
    if init_model is not None:
        model = init_model
        policy_kwargs: dict[str, Any] = {}
    else:
        policy_kwargs = preset.policy_kwargs(recurrent)
        model = build_model("MlpLstmPolicy" if recurrent else "MlpPolicy", env.observation_space,
                            env.action_space, recurrent=recurrent, policy_kwargs=policy_kwargs,
                            seed=seed, algorithm_kwargs={"gamma": gamma})
    obs_rms = init_obs_rms if init_obs_rms is not None else fit_obs_normalizer(trajectories)
    value_pretraining = value_pretraining and all(
        getattr(t, "rews", None) is not None for t in trajectories)
    returns = (fit_return_normalizer(trajectories, gamma)
               if value_pretraining and norm_reward else None)
    layout = env.unwrapped.layout
    bc = SequenceBC(policy=model.policy, trajectories=trajectories,
                    rng=np.random.default_rng(seed), obs_normalizer=obs_rms,
                    validation_fraction=validation_fraction, value_pretraining=value_pretraining,
                    gamma=gamma, return_normalizer=returns,
                    tied_choices=tie_scorer(expert, layout, np.asarray(trajectories[0].obs)[0]),
                    progress=progress, logger=logger, **training)
    history = bc.train()
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
    }
    return CloneResult(model=model, obs_rms=obs_rms, return_normalizer=returns, history=history,
                       summary=summary, training_kwargs=training, policy_kwargs=policy_kwargs)
