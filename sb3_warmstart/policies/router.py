"""A trained SB3 policy behind the router interface, to evaluate it next to the heuristics.

``PolicyRouter(model, obs_rms)`` has ``reset(num_replicas, rng)`` and ``select(view) -> int``
like :mod:`llm_cluster_env.routing.heuristics`, so ``llm_cluster_env.tools.evaluation.run_episode`` and
``evaluate_routers`` run learned policies on the same seeds as heuristics. It reads the raw
observation (``view.obs``), normalises it exactly as ``VecNormalize`` does during training, and
for recurrent policies carries the LSTM state from step to step (zeroed by ``reset()``, as
RecurrentPPO zeroes it at an episode start).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.running_mean_std import RunningMeanStd

from sb3_warmstart.common.normalize import ObsNormalizer
from sb3_warmstart.policies.replica_set import (
    SET_POLICIES,
    SchemaMismatch,
    clip_share,
    policy_for_spaces,
)


class PolicyRouter:
    """Routes with an SB3 ``PPO``/``RecurrentPPO`` model (or its policy).

    :param model: an SB3 algorithm (``model.policy`` is used) or an ``ActorCriticPolicy`` /
        ``RecurrentActorCriticPolicy``. A replica-set policy (:mod:`sb3_warmstart.policies.replica_set`)
        routes clusters of any size: on an observation of another width the router checks the
        per-replica feature schema (refusing another one, naming the feature) and rebuilds the
        policy for that many replica slots with the same weights.
    :param obs_normalizer: the observation statistics the policy was trained with
        (``ObsNormalizer``, a bare ``RunningMeanStd`` with VecNormalize's default clip/epsilon,
        or a ``VecNormalize`` wrapper, whose statistics are copied), or ``None`` for raw inputs.
        Ignored for the replica-set policies, which scale their inputs themselves.
    :param deterministic: take the most likely replica (default) or sample from the policy.
    :param use_predict: go through SB3's ``policy.predict`` (its sampling uses torch's global
        generator) instead of the direct path, whose sampling draws from the ``rng`` given to
        :meth:`reset`. Both give the same deterministic actions.
    :param name: name shown in comparison tables.
    """

    def __init__(self, model: BaseAlgorithm | ActorCriticPolicy,
                 obs_normalizer: ObsNormalizer | RunningMeanStd | None = None, *,
                 deterministic: bool = True, use_predict: bool = False,
                 name: str = "policy") -> None:
        policy = model.policy if isinstance(model, BaseAlgorithm) else model
        if not isinstance(policy, ActorCriticPolicy):
            raise TypeError(f"model: expected an SB3 algorithm or ActorCriticPolicy, got "
                            f"{type(model).__name__}")
        if not isinstance(policy.action_space, spaces.Discrete):
            raise TypeError(f"policy.action_space={policy.action_space}: only Discrete actions")
        self.replica_set = isinstance(policy, SET_POLICIES)
        if self.replica_set:
            obs_normalizer = None
        if isinstance(obs_normalizer, RunningMeanStd):
            obs_normalizer = ObsNormalizer(obs_normalizer)
        elif obs_normalizer is not None and not isinstance(obs_normalizer, ObsNormalizer):
            obs_normalizer = ObsNormalizer.from_vec_normalize(obs_normalizer)
        shape = tuple(policy.observation_space.shape)
        if obs_normalizer is not None and obs_normalizer.shape != shape:
            raise ValueError(f"obs_normalizer: statistics have shape {obs_normalizer.shape}, "
                             f"the policy's observations {shape}")
        self.policy = policy
        self.obs_normalizer = obs_normalizer
        self.deterministic = bool(deterministic)
        self.use_predict = bool(use_predict)
        self.name = name
        self.recurrent = isinstance(policy, RecurrentActorCriticPolicy)
        self.num_actions = int(policy.action_space.n)
        self.obs_shape = shape
        self.num_replicas = self.num_actions
        self.rng = np.random.default_rng(0)
        self._state = None
        self._episode_start = True
        self._trained = policy  # the replica-set policy as trained (for other widths)
        self._by_width = {shape: policy}
        self._checked_layouts: set[int] = set()
        self._seen: list[np.ndarray] = []  # observations routed since clip_report()

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        """Start an episode on ``num_replicas`` replicas (must equal the action count, except
        for a replica-set policy, which routes any number)."""
        if num_replicas != self.num_actions and not self.replica_set:
            raise ValueError(f"num_replicas={num_replicas}: the policy routes to "
                             f"{self.num_actions} replicas")
        self.num_replicas = num_replicas
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.policy.set_training_mode(False)
        self._state = None
        self._episode_start = True

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """The policy's input for a raw observation (float32, VecNormalize's transform)."""
        obs = np.asarray(obs, dtype=np.float32)
        if obs.shape != self.obs_shape:
            raise ValueError(f"observation shape {obs.shape}, the policy expects {self.obs_shape}")
        return self.obs_normalizer(obs) if self.obs_normalizer is not None else obs

    def _adapt(self, view) -> None:
        """Use the replica-set policy built for ``view``'s observation width (and check, once
        per layout, that its features are the ones the policy was trained with)."""
        layout = view.layout
        if id(layout) not in self._checked_layouts:
            self._trained.check_schema(
                layout.replica_features, layout.names[layout.replica_block:layout.history_offset])
            if layout.config.history_window:
                raise SchemaMismatch("observation.history_window="
                                     f"{layout.config.history_window}: a replica-set policy "
                                     "reads no decision history")
            self._checked_layouts.add(id(layout))
        shape = tuple(np.shape(view.obs))
        policy = self._by_width.get(shape)
        if policy is None:
            policy = policy_for_spaces(self._trained, spaces.Box(0.0, np.inf, shape, np.float32),
                                       spaces.Discrete(layout.num_slots))
            policy.set_training_mode(False)
            self._by_width[shape] = policy
        self.policy, self.obs_shape = policy, shape
        self.num_actions = int(policy.action_space.n)

    def clip_report(self) -> dict[str, float]:
        """For a replica-set policy: the share of the decisions since the last call with any
        input at the clip bound of its input scaling (and of all inputs); empty otherwise."""
        seen, self._seen = self._seen, []
        if not self.replica_set or not seen:
            return {}
        by_width: dict[tuple[int, ...], list[np.ndarray]] = {}
        for obs in seen:
            by_width.setdefault(obs.shape, []).append(obs)
        rows = total = 0.0
        inputs = 0.0
        for shape, group in by_width.items():
            share = clip_share(self._by_width[shape].features_extractor, np.stack(group))
            rows += share["decisions_at_clip"] * len(group)
            inputs += share["inputs_at_clip"] * len(group)
            total += len(group)
        return {"decisions_at_clip": rows / total, "inputs_at_clip": inputs / total}

    def select(self, view) -> int:
        """The replica for the pending request of ``view`` (a ``ClusterView``)."""
        if self.replica_set:
            self._adapt(view)
            self._seen.append(np.asarray(view.obs, dtype=np.float32))
        obs = self.normalize(view.obs)
        if self.use_predict:
            return self._select_predict(obs)
        policy = self.policy
        obs_t = th.as_tensor(obs[None], device=policy.device)
        with th.no_grad():
            if self.recurrent:
                if self._state is None:
                    shape = policy.lstm_hidden_state_shape
                    z = th.zeros(shape, device=policy.device)
                    self._state = (z, z.clone())
                start = th.tensor([float(self._episode_start)], device=policy.device)
                dist, self._state = policy.get_distribution(obs_t, self._state, start)
            else:
                dist = policy.get_distribution(obs_t)
            self._episode_start = False
            if self.deterministic:
                return int(dist.mode()[0])
            probs = dist.distribution.probs[0].cpu().numpy().astype(np.float64)
        return int(self.rng.choice(self.num_actions, p=probs / probs.sum()))

    def _select_predict(self, obs: np.ndarray) -> int:
        if self.recurrent:
            action, self._state = self.policy.predict(
                obs[None], state=self._state,
                episode_start=np.array([self._episode_start]), deterministic=self.deterministic)
        else:
            action, _ = self.policy.predict(obs[None], deterministic=self.deterministic)
        self._episode_start = False
        return int(np.asarray(action).reshape(-1)[0])

    def tied_choices(self, view) -> None:
        """A learned policy has no tie set (see ``Router.tied_choices``)."""
        return None

    def __repr__(self) -> str:
        kind = "recurrent" if self.recurrent else "feed-forward"
        return (f"PolicyRouter({self.name!r}, {kind}, deterministic={self.deterministic}, "
                f"normalized={self.obs_normalizer is not None})")


def load_policy_router(path: str | Path, name: str = "policy",
                       deterministic: bool = True) -> PolicyRouter:
    """A :class:`PolicyRouter` from a run folder (its ``final_model.zip``), a checkpoint
    directory, or a policy zip of :mod:`sb3_warmstart.policies.policy_file`."""
    from sb3_warmstart.policies.run_loading import load_policy

    model, obs_rms, _, _, _ = load_policy(Path(path))
    return PolicyRouter(model, obs_rms, deterministic=deterministic, name=name)


__all__ = ["PolicyRouter", "load_policy_router"]
