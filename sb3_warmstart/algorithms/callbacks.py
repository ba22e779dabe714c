"""Stable-Baselines3 callbacks for PPO on ``LLMCluster-v0``: temperature control, normaliser
stabilisation and monitoring.

* :class:`TemperatureController` sets ``policy.temperature`` (logits are divided by it) at the
  start of every rollout, adapting it from EMAs of the rollout's policy entropy and dispatch
  balance, with exploration pulses when dispatch collapses onto few replicas.
* :class:`NormalizerStabilization` makes the policy act like the ``random`` router and defers
  optimiser updates for the first ``stabilization_steps`` env steps, so the ``VecNormalize``
  statistics settle before any gradient step.
* :class:`CriticWarmup` then lets only the critic learn for ``critic_warmup_steps`` env steps
  while the policy acts, so a critic fitted to other rewards catches up before the actor moves.
* :class:`TrainingMonitor` logs the action distribution, balance score, rewards and episode
  latency metrics, and keeps a history for learning curves and CSV export.
* :class:`HyperparameterLogger` writes the run's hyperparameters once, at the start of
  training, as TensorBoard hparams (SB3's ``HParam``).

The first three only set attributes that our policy and algorithm honour
(``sb3_warmstart.policies.recurrent.Temperature*Policy``: ``temperature``, ``uniform_actions``;
``sb3_warmstart.algorithms.ppo.KL*PPO``: ``updates_deferred``, ``critic_only_updates``). On a
model without them they would have no effect, so they raise a ``TypeError`` when the callback
is initialised instead.

All per-rollout work happens in ``_on_rollout_start``/``_on_rollout_end``; the state that must
survive a resume is exposed through ``state_dict()``/``load_state_dict()`` (plain, JSON-able
Python values).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecNormalize

from llm_cluster_env.atomic import atomic_write_text
from llm_cluster_env.tools.evaluation import balance_score
from sb3_warmstart.common.normalize import freeze_obs_stats, obs_stats_frozen
from sb3_warmstart.pipeline.config import TemperatureConfig
from sb3_warmstart.policies.parameters import critic_only_parameters

EPISODE_METRICS = ("e2e_mean", "e2e_p99", "ttft_mean", "tpot_mean", "slo_attainment",
                   "balance", "throughput_rps")
"""Episode statistics (keys of the final step's ``info["metrics"]``) logged as ``episode/<key>``."""


def _require_attribute(obj: Any, name: str, who: str, hint: str) -> None:
    if not hasattr(obj, name):
        raise TypeError(f"{who} needs `{name}` on {type(obj).__name__}, which has none: {hint}")


def _num_actions(model: Any, who: str) -> int:
    space = model.action_space
    if not isinstance(space, spaces.Discrete):
        raise TypeError(f"{who} needs a Discrete action space, got {space!r}")
    return int(space.n)


def _check_state_keys(state: Mapping[str, Any], expected: Sequence[str], who: str) -> None:
    missing = [key for key in expected if key not in state]
    if missing:
        raise KeyError(f"{who}.load_state_dict: missing keys {missing}")


# --------------------------------------------------------------------------- temperature
class TemperatureController(BaseCallback):
    """Adapt the policy's softmax temperature from entropy and dispatch balance, with pulses.

    **Measurements** (at each rollout end, from ``model.rollout_buffer``):

    * entropy ``H`` (nats): minus the mean stored log-probability of the sampled actions. The
      buffer holds log-probs under the tempered behaviour distribution, so this is an unbiased
      Monte-Carlo estimate of its mean categorical entropy; it needs no extra forward pass and
      works unchanged for recurrent policies (whose exact entropy would need the LSTM states).
    * balance ``B``: :func:`~llm_cluster_env.tools.evaluation.balance_score` of the rollout's action
      counts per replica (1 = even), and the largest replica share ``S``.

    **Rule** (one step per *adaptive* rollout, ``N`` actions)::

        H_ema = d * H_ema + (1 - d) * H          (first adaptive rollout: H_ema = H)
        B_ema = d * B_ema + (1 - d) * B
        log T += rate * (w_H * (H* - H_ema) / ln N + w_B * (B* - B_ema))
        T = clip(T, min_temperature, max_temperature)

    so entropy or balance below target raises ``T`` (flatter logits), above target lowers it.
    Dividing the entropy error by ``ln N`` (the uniform policy's entropy) puts both errors on a
    comparable, dimensionless scale.

    **Exploration pulses**: an adaptive rollout *collapses* when ``B < collapse_balance`` or
    ``S > collapse_max_share``. Then the next ``pulse_rollouts`` rollouts run at
    ``pulse_temperature``; pulse rollouts neither update the EMAs nor adapt ``T`` (their
    statistics reflect the pulse, not the adaptive temperature), and the first ``pulse_cooldown``
    adaptive rollouts after a pulse cannot trigger another. Adaptation resumes from the ``T``
    reached before the pulse.

    While ``policy.uniform_actions`` is True (see :class:`NormalizerStabilization`) the actions
    do not come from the policy, so the controller is paused: no measurement is used.

    Logged each rollout: ``temperature/value`` (the temperature used for that rollout),
    ``temperature/base`` (the adaptive temperature after the update), ``temperature/entropy``,
    ``temperature/entropy_ema``, ``temperature/balance_ema``, ``temperature/pulse`` (1 for a
    pulse rollout) and ``temperature/paused``.

    :param config: the controller's knobs (:class:`~sb3_warmstart.pipeline.config.TemperatureConfig`, where
        each is documented, defaulted and validated): ``target_entropy`` in nats (``None`` =
        ``0.5 * ln N``: an effective number of choices ``exp(H) = sqrt(N)``), ``target_balance``,
        ``adaptation_rate`` (step of ``log T`` per rollout for unit error), ``ema_decay`` ``d``,
        ``entropy_weight`` ``w_H``, ``balance_weight`` ``w_B``, ``initial_temperature``, the
        bounds ``min_temperature``/``max_temperature``, ``collapse_balance``,
        ``collapse_max_share`` (``None`` = ``(1 + 1/N) / 2``, halfway between the fair share
        and everything), ``pulse_temperature``, ``pulse_rollouts`` (0 disables pulses) and
        ``pulse_cooldown``. ``enabled`` is the caller's business.
    :param verbose: 1 prints pulses.
    """

    _STATE_KEYS = ("temperature", "entropy_ema", "balance_ema", "pulse_remaining",
                   "cooldown_remaining", "num_rollouts", "num_adaptive_rollouts", "num_pulses",
                   "num_timesteps", "num_actions")

    def __init__(self, config: TemperatureConfig, *, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if not isinstance(config, TemperatureConfig):
            raise TypeError(f"config: expected a TemperatureConfig, got {type(config).__name__}")
        self.config = config
        # state (see state_dict)
        self.temperature = float(config.initial_temperature)
        self.entropy_ema: float | None = None
        self.balance_ema: float | None = None
        self.pulse_remaining = 0
        self.cooldown_remaining = 0
        self.num_rollouts = 0
        self.num_adaptive_rollouts = 0
        self.num_pulses = 0
        self.num_actions: int | None = None
        self._last_num_timesteps = 0

    # ------------------------------------------------------------------ logic
    @property
    def pulsing(self) -> bool:
        """Whether the next (or current) rollout is a pulse rollout."""
        return self.pulse_remaining > 0

    @property
    def current_temperature(self) -> float:
        """The temperature the next (or current) rollout uses."""
        return float(self.config.pulse_temperature) if self.pulsing else self.temperature

    def resolved_targets(self, num_actions: int) -> tuple[float, float]:
        """``(target_entropy, collapse_max_share)`` for ``num_actions`` actions, defaults filled."""
        if num_actions < 2:
            raise ValueError(f"num_actions={num_actions}: temperature control needs >= 2 actions")
        if self.num_actions is not None and num_actions != self.num_actions:
            raise ValueError(f"num_actions={num_actions} differs from the {self.num_actions} "
                             "actions this controller was used with")
        max_entropy = math.log(num_actions)
        cfg = self.config
        target_entropy = 0.5 * max_entropy if cfg.target_entropy is None else cfg.target_entropy
        if target_entropy > max_entropy + 1e-12:
            raise ValueError(f"target_entropy={target_entropy!r} nats exceeds ln N = "
                             f"{max_entropy:.4f} for N={num_actions} actions")
        share = ((1 + 1 / num_actions) / 2 if cfg.collapse_max_share is None
                 else cfg.collapse_max_share)
        if share <= 1 / num_actions:
            raise ValueError(f"collapse_max_share={share!r}: must exceed the fair share "
                             f"1/N = {1 / num_actions:.4f}")
        return target_entropy, share

    def update(self, entropy: float, action_counts: Sequence[float] | np.ndarray) -> dict:
        """Account for one finished (non-paused) rollout and update the state.

        :param entropy: estimated behaviour entropy of the rollout (nats).
        :param action_counts: how many times each action (replica) was chosen in the rollout.
        :return: the rollout's ``temperature`` (used), ``entropy``, ``balance``, ``max_share``
            and flags ``pulse`` (it was a pulse rollout) and ``collapse`` (it triggered one).
        """
        counts = np.asarray(action_counts, dtype=np.float64).reshape(-1)
        if counts.size < 2 or np.any(counts < 0) or not counts.sum() > 0:
            raise ValueError(f"action_counts={counts.tolist()}: need >= 2 non-negative counts "
                             "with a positive sum")
        if not math.isfinite(entropy):
            raise ValueError(f"entropy={entropy!r}: must be finite")
        target_entropy, collapse_share = self.resolved_targets(counts.size)
        self.num_actions = int(counts.size)
        balance = balance_score(counts)
        max_share = float(counts.max() / counts.sum())
        cfg = self.config
        used = self.current_temperature
        pulse = self.pulsing
        collapse = False
        self.num_rollouts += 1
        if pulse:
            self.pulse_remaining -= 1
            if self.pulse_remaining == 0:
                self.cooldown_remaining = int(cfg.pulse_cooldown)
        else:
            self.num_adaptive_rollouts += 1
            d = float(cfg.ema_decay)
            self.entropy_ema = (float(entropy) if self.entropy_ema is None
                                else d * self.entropy_ema + (1 - d) * float(entropy))
            self.balance_ema = (balance if self.balance_ema is None
                                else d * self.balance_ema + (1 - d) * balance)
            error = (float(cfg.entropy_weight) * (target_entropy - self.entropy_ema)
                     / math.log(counts.size)
                     + float(cfg.balance_weight) * (float(cfg.target_balance) - self.balance_ema))
            log_t = math.log(self.temperature) + float(cfg.adaptation_rate) * error
            self.temperature = float(min(max(math.exp(log_t), float(cfg.min_temperature)),
                                         float(cfg.max_temperature)))
            if self.cooldown_remaining > 0:
                self.cooldown_remaining -= 1
            elif cfg.pulse_rollouts > 0 and (balance < cfg.collapse_balance
                                             or max_share > collapse_share):
                collapse = True
                self.pulse_remaining = int(cfg.pulse_rollouts)
                self.num_pulses += 1
        return {"temperature": used, "entropy": float(entropy), "balance": balance,
                "max_share": max_share, "pulse": pulse, "collapse": collapse}

    # ---------------------------------------------------------------- callback
    def _init_callback(self) -> None:
        who = type(self).__name__
        _require_attribute(self.model.policy, "temperature", who,
                           "use sb3_warmstart.policies.recurrent.TemperatureMlpPolicy / "
                           "TemperatureMlpLstmPolicy (on a stock policy it would have no effect)")
        self.resolved_targets(_num_actions(self.model, who))

    def _on_rollout_start(self) -> None:
        self.model.policy.temperature = float(self.current_temperature)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self._last_num_timesteps = int(self.model.num_timesteps)
        if getattr(self.model.policy, "uniform_actions", False):
            self.logger.record("temperature/value", float(self.model.policy.temperature))
            self.logger.record("temperature/paused", 1.0)
            return
        buffer = self.model.rollout_buffer
        size = buffer.buffer_size if buffer.full else buffer.pos
        actions = np.asarray(buffer.actions[:size]).reshape(-1).astype(np.int64)
        log_probs = np.asarray(buffer.log_probs[:size], dtype=np.float64).reshape(-1)
        if actions.size == 0:
            return
        counts = np.bincount(actions, minlength=_num_actions(self.model, type(self).__name__))
        stats = self.update(float(-log_probs.mean()), counts)
        if stats["collapse"] and self.verbose >= 1:
            print(f"TemperatureController: dispatch collapsed at {self._last_num_timesteps} steps "
                  f"(balance {stats['balance']:.3f}, max share {stats['max_share']:.3f}): "
                  f"T = {self.config.pulse_temperature} for {self.config.pulse_rollouts} "
                  f"rollouts")
        record = self.logger.record
        record("temperature/value", stats["temperature"])
        record("temperature/base", self.temperature)
        record("temperature/entropy", stats["entropy"])
        record("temperature/entropy_ema", self.entropy_ema if self.entropy_ema is not None
               else float("nan"))
        record("temperature/balance_ema", self.balance_ema if self.balance_ema is not None
               else float("nan"))
        record("temperature/pulse", float(stats["pulse"]))
        record("temperature/paused", 0.0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The controller's full state as plain Python values (JSON-able)."""
        return {
            "temperature": self.temperature,
            "entropy_ema": self.entropy_ema,
            "balance_ema": self.balance_ema,
            "pulse_remaining": self.pulse_remaining,
            "cooldown_remaining": self.cooldown_remaining,
            "num_rollouts": self.num_rollouts,
            "num_adaptive_rollouts": self.num_adaptive_rollouts,
            "num_pulses": self.num_pulses,
            "num_timesteps": self._last_num_timesteps,
            "num_actions": self.num_actions,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the controller then continues exactly like the original."""
        _check_state_keys(state, self._STATE_KEYS, type(self).__name__)
        temperature = float(state["temperature"])
        low, high = self.config.min_temperature, self.config.max_temperature
        if not low <= temperature <= high:
            raise ValueError(f"state['temperature']={temperature!r}: outside this controller's "
                             f"bounds [{low}, {high}]")
        self.temperature = temperature
        self.entropy_ema = None if state["entropy_ema"] is None else float(state["entropy_ema"])
        self.balance_ema = None if state["balance_ema"] is None else float(state["balance_ema"])
        self.pulse_remaining = int(state["pulse_remaining"])
        self.cooldown_remaining = int(state["cooldown_remaining"])
        self.num_rollouts = int(state["num_rollouts"])
        self.num_adaptive_rollouts = int(state["num_adaptive_rollouts"])
        self.num_pulses = int(state["num_pulses"])
        self._last_num_timesteps = int(state["num_timesteps"])
        self.num_actions = None if state["num_actions"] is None else int(state["num_actions"])


# ------------------------------------------------------------------ stabilisation
class NormalizerStabilization(BaseCallback):
    """Random routing and no gradient steps until the ``VecNormalize`` statistics settle.

    Every rollout that *starts* before ``model.num_timesteps`` reaches ``stabilization_steps``
    is a stabilisation rollout: the callback sets ``policy.uniform_actions = True`` (the policy
    samples replicas uniformly, like the ``random`` router) and ``model.updates_deferred = True``
    (the ``train()`` after that rollout makes no gradient step). The effective length is thus
    ``stabilization_steps`` rounded up to whole rollouts (``n_steps * n_envs`` env steps), so no
    rollout mixes random and policy actions and no random-action rollout is trained on. At the
    first rollout start past the threshold both flags are switched back to False; the end of
    the last stabilisation rollout logs ``stabilization/done = 1`` once.

    The decision keys off ``model.num_timesteps`` only, so the callback is stateless: a run
    resumed past the threshold does not stabilise again (it only makes sure both flags are
    False, even if a checkpoint saved them True). At training end both flags are reset to False
    so the model never leaves ``learn()`` acting at random; a following ``learn()`` call
    re-enables them if the threshold was not reached.

    :param stabilization_steps: env steps (summed over envs) of random routing, >= 0.
    :param update_obs_stats: let the observation statistics update. False freezes them (see
        :mod:`sb3_warmstart.common.normalize`) for the whole run -- for warm-started policies, whose
        inputs were normalised with the demonstrations' statistics -- and only the reward
        statistics settle. True with statistics that are already frozen is an error.
    :param verbose: 1 prints when stabilisation ends.
    """

    def __init__(self, stabilization_steps: int, *, update_obs_stats: bool,
                 verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if int(stabilization_steps) != stabilization_steps or stabilization_steps < 0:
            raise ValueError(f"stabilization_steps={stabilization_steps!r}: must be an integer "
                             ">= 0")
        self.stabilization_steps = int(stabilization_steps)
        self.update_obs_stats = bool(update_obs_stats)
        self._rollout_active = False
        self._done_logged = False

    @property
    def active(self) -> bool:
        """Whether the current (or next) rollout is a stabilisation rollout."""
        return int(self.model.num_timesteps) < self.stabilization_steps

    def _init_callback(self) -> None:
        who = type(self).__name__
        _require_attribute(self.model.policy, "uniform_actions", who,
                           "use sb3_warmstart.policies.recurrent.TemperatureMlpPolicy / "
                           "TemperatureMlpLstmPolicy (on a stock policy it would have no effect)")
        _require_attribute(self.model, "updates_deferred", who,
                           "use sb3_warmstart.algorithms.ppo.KLPPO / KLRecurrentPPO (a stock algorithm "
                           "would keep training during stabilisation)")
        vec_normalize = self.model.get_vec_normalize_env()
        if not isinstance(vec_normalize, VecNormalize):
            raise ValueError(f"{who} needs the training env wrapped in VecNormalize "
                             "(see sb3_warmstart.common.normalize.make_vec_normalize)")
        if vec_normalize.norm_obs:
            if self.update_obs_stats and obs_stats_frozen(vec_normalize):
                raise ValueError("update_obs_stats=True but the VecNormalize observation "
                                 "statistics are frozen; pass update_obs_stats=False for "
                                 "warm-started runs or unfreeze them with freeze_obs_stats()")
            if not self.update_obs_stats:
                freeze_obs_stats(vec_normalize, True)
        if self.active and not vec_normalize.training:
            raise ValueError(f"{who}: VecNormalize.training is False, so its statistics "
                             "would not settle during stabilisation")

    def _set_flags(self, active: bool) -> None:
        self.model.policy.uniform_actions = active
        self.model.updates_deferred = active

    def _on_rollout_start(self) -> None:
        self._rollout_active = self.active
        self._set_flags(self._rollout_active)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self._rollout_active and not self.active and not self._done_logged:
            self._done_logged = True
            self.logger.record("stabilization/done", 1.0)
            if self.verbose >= 1:
                print(f"NormalizerStabilization: done after {self.model.num_timesteps} steps; "
                      "policy actions and updates resume with the next rollout")

    def _on_training_end(self) -> None:
        self._set_flags(False)
        self._rollout_active = False


class CriticWarmup(BaseCallback):
    """Value-only updates for the first ``warmup_steps`` env steps after stabilisation.

    Every rollout that *starts* at ``model.num_timesteps`` in ``[stabilization_steps,
    stabilization_steps + warmup_steps)`` is a warm-up rollout: the policy acts as usual (so
    the critic learns the values of the policy PPO will improve) and the callback sets
    ``model.critic_only_updates = True``, so the ``train()`` after it fits only the critic's own
    parameters (:meth:`sb3_warmstart.algorithms.ppo.KLRegularisedMixin._train_critic_only`).
    Rollouts of the stabilisation itself are deferred and not affected. Like
    :class:`NormalizerStabilization` the decision keys off ``model.num_timesteps`` alone, so the
    callback is stateless and a resumed run continues the same schedule; at training end the
    flag is reset to False.

    :param stabilization_steps: env steps of normaliser stabilisation before the warm-up, >= 0.
    :param warmup_steps: env steps of the warm-up, >= 0 (0: never active).
    """

    def __init__(self, stabilization_steps: int, warmup_steps: int, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        for name, value in (("stabilization_steps", stabilization_steps),
                            ("warmup_steps", warmup_steps)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name}={value!r}: must be an integer >= 0")
        self.start = int(stabilization_steps)
        self.end = int(stabilization_steps) + int(warmup_steps)

    @property
    def active(self) -> bool:
        """Whether the current (or next) rollout is a warm-up rollout."""
        return self.start <= int(self.model.num_timesteps) < self.end

    def _init_callback(self) -> None:
        _require_attribute(self.model, "critic_only_updates", type(self).__name__,
                           "use sb3_warmstart.algorithms.ppo.KLPPO / KLRecurrentPPO (a stock "
                           "algorithm would update the actor during the warm-up)")
        if self.end > self.start and not critic_only_parameters(self.model.policy):
            raise ValueError(f"critic_warmup_steps={self.end - self.start}: "
                             f"{type(self.model.policy).__name__} has no critic-only parameters "
                             "(its value head shares every weight with the actor)")

    def _on_rollout_start(self) -> None:
        self.model.critic_only_updates = self.active

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self.model.critic_only_updates = False


# ------------------------------------------------------------------------ monitor
class TrainingMonitor(BaseCallback):
    """Per-rollout action distribution, balance and reward; per-episode latency metrics.

    Logged through the SB3 logger (TensorBoard, CSV, ...):

    * per rollout: ``rollout/action_share_{i}`` (fraction of the rollout's requests routed to
      replica ``i``; they sum to 1), ``rollout/balance`` (balance score of those counts),
      ``rollout/reward_mean`` (mean raw step reward, before ``VecNormalize``), and during the
      first ``warmup_rollouts`` rollouts of the run ``reward_warmup/mean`` and
      ``reward_warmup/std`` (mean and std of the raw step rewards);
    * per episode end (the final step's ``info["metrics"]``, which SB3's auto-resetting VecEnvs
      keep in the terminal step's info): ``episode/<key>`` for ``key`` in ``episode_metrics``,
      averaged over the episodes that ended since the last dump (``record_mean``).

    The history keeps one row per rollout (``kind="rollout"``: ``rollout``, ``num_timesteps``,
    ``steps``, ``reward_mean``, ``reward_std``, ``balance``, ``action_share_{i}``) and one per
    episode (``kind="episode"``: ``episode``, ``num_timesteps``, ``env_index``, ``episode_seed``
    when the env reports one, and every numeric entry of ``info["metrics"]``), in the order they
    happened. ``state_dict()`` carries it, so a
    resumed run appends to it (and does not repeat the reward warm-up).

    :param warmup_rollouts: number of first rollouts that also log ``reward_warmup/*``, >= 0.
    :param episode_metrics: episode statistics logged as ``episode/<key>``; missing keys are
        skipped.
    :param verbose: unused (SB3 convention).
    """

    _STATE_KEYS = ("rows", "num_rollouts", "num_episodes")

    def __init__(self, *, warmup_rollouts: int = 10,
                 episode_metrics: Sequence[str] = EPISODE_METRICS, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if int(warmup_rollouts) != warmup_rollouts or warmup_rollouts < 0:
            raise ValueError(f"warmup_rollouts={warmup_rollouts!r}: must be an integer >= 0")
        self.warmup_rollouts = int(warmup_rollouts)
        self.episode_metrics = tuple(episode_metrics)
        self.num_rollouts = 0
        self.num_episodes = 0
        self._rows: list[dict[str, Any]] = []
        self._num_actions = 0
        self._vec_normalize: VecNormalize | None = None
        self._counts = np.zeros(0, dtype=np.int64)
        self._rewards: list[np.ndarray] = []

    def _init_callback(self) -> None:
        self._num_actions = _num_actions(self.model, type(self).__name__)
        self._vec_normalize = self.model.get_vec_normalize_env()
        self._counts = np.zeros(self._num_actions, dtype=np.int64)

    def _on_rollout_start(self) -> None:
        self._counts = np.zeros(self._num_actions, dtype=np.int64)
        self._rewards = []

    def _on_step(self) -> bool:
        actions = np.asarray(self.locals["actions"]).reshape(-1).astype(np.int64)
        self._counts += np.bincount(actions, minlength=self._num_actions)
        if self._vec_normalize is not None:
            rewards = self._vec_normalize.get_original_reward()
        else:
            rewards = self.locals["rewards"]
        self._rewards.append(np.asarray(rewards, dtype=np.float64).reshape(-1))
        for env_index, info in enumerate(self.locals["infos"]):
            metrics = info.get("metrics")
            if metrics is not None:
                self._record_episode(env_index, metrics, info.get("episode_seed"))
        return True

    def _record_episode(self, env_index: int, metrics: Mapping[str, Any],
                        episode_seed: int | None = None) -> None:
        self.num_episodes += 1
        row: dict[str, Any] = {"kind": "episode", "num_timesteps": int(self.num_timesteps),
                               "episode": self.num_episodes, "env_index": env_index}
        if episode_seed is not None:  # replays the episode's arrivals (sb3_warmstart.pipeline.envs)
            row["episode_seed"] = int(episode_seed)
        for key, value in metrics.items():
            if isinstance(value, (int, float, np.integer, np.floating)):
                row[key] = float(value)
        self._rows.append(row)
        for key in self.episode_metrics:
            if key in row:
                self.logger.record_mean(f"episode/{key}", row[key])

    def _on_rollout_end(self) -> None:
        total = int(self._counts.sum())
        if total == 0:
            return
        self.num_rollouts += 1
        shares = self._counts / total
        rewards = np.concatenate(self._rewards)
        row: dict[str, Any] = {
            "kind": "rollout", "num_timesteps": int(self.model.num_timesteps),
            "rollout": self.num_rollouts, "steps": total,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "balance": balance_score(self._counts),
        }
        for i, share in enumerate(shares):
            row[f"action_share_{i}"] = float(share)
        self._rows.append(row)
        record = self.logger.record
        for i in range(self._num_actions):
            record(f"rollout/action_share_{i}", row[f"action_share_{i}"])
        record("rollout/balance", row["balance"])
        record("rollout/reward_mean", row["reward_mean"])
        if self.num_rollouts <= self.warmup_rollouts:
            record("reward_warmup/mean", row["reward_mean"])
            record("reward_warmup/std", row["reward_std"])

    # ---------------------------------------------------------------- history
    def history_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Copies of the history rows, oldest first.

        :param kind: ``"rollout"``, ``"episode"`` or ``None`` for both.
        """
        if kind not in (None, "rollout", "episode"):
            raise ValueError(f"kind={kind!r}: must be 'rollout', 'episode' or None")
        return [dict(row) for row in self._rows if kind is None or row["kind"] == kind]

    def write_csv(self, path: str | os.PathLike, kind: str | None = None) -> Path:
        """Write the history as CSV atomically (temporary file, then rename); returns the path.

        Columns are the union of the rows' keys in first-seen order; absent values are empty.

        :param path: destination file; its directory is created if needed.
        :param kind: as in :meth:`history_rows`.
        """
        rows = self.history_rows(kind)
        columns: dict[str, None] = {"kind": None, "num_timesteps": None}
        for row in rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(path, buffer.getvalue())

    def state_dict(self) -> dict[str, Any]:
        """History and counters as plain Python values."""
        return {"rows": self.history_rows(), "num_rollouts": self.num_rollouts,
                "num_episodes": self.num_episodes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; new rows are appended to the restored history."""
        _check_state_keys(state, self._STATE_KEYS, type(self).__name__)
        self._rows = [dict(row) for row in state["rows"]]
        self.num_rollouts = int(state["num_rollouts"])
        self.num_episodes = int(state["num_episodes"])


# ------------------------------------------------------------------ hyperparameters
#: Algorithm attributes written as hparams when the model has them (SB3's PPO family).
HPARAM_ATTRIBUTES = ("learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda",
                     "clip_range", "clip_range_vf", "normalize_advantage", "ent_coef", "vf_coef",
                     "max_grad_norm", "target_kl", "n_envs", "seed")
#: Tags the hparams view shows beside the hyperparameters (scalars the run logs anyway).
HPARAM_METRICS = ("rollout/ep_rew_mean", "train/loss", "train/approx_kl")


def _hparam_value(value: Any) -> bool | int | float | str:
    """A value TensorBoard's hparams accept: numbers and strings as they are, anything else
    (None, schedules, classes) as its ``repr``."""
    if isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, type):
        return value.__name__
    return repr(value)


class HyperparameterLogger(BaseCallback):
    """Record the run's hyperparameters as TensorBoard hparams, once per run.

    At the start of the first ``learn()`` of a run (``num_timesteps == 0``; a resumed or
    chunked run does not write a second session) it records SB3's ``HParam`` under
    ``hparams``: the algorithm and policy class, the attributes of :data:`HPARAM_ATTRIBUTES`
    the model has (schedules as their ``repr``), and for the KL algorithms every field of
    ``model.kl`` under ``kl/``, with :data:`HPARAM_METRICS` as the metrics to show beside them.
    Only the TensorBoard output receives it (SB3 writes it at the next dump).

    :param extra: more ``name -> value`` pairs to record (e.g. the env id or scenario).
    """

    def __init__(self, extra: Mapping[str, Any] | None = None, *, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        self.extra = dict(extra or {})

    def hyperparameters(self) -> dict[str, bool | int | float | str]:
        """The ``name -> value`` pairs this callback records for ``self.model``."""
        model = self.model
        values: dict[str, Any] = {"algorithm": type(model).__name__,
                                  "policy": type(model.policy).__name__}
        for name in HPARAM_ATTRIBUTES:
            if hasattr(model, name):
                values[name] = getattr(model, name)
        kl = getattr(model, "kl", None)
        if kl is not None and dataclasses.is_dataclass(kl):
            values.update({f"kl/{f.name}": getattr(kl, f.name) for f in dataclasses.fields(kl)})
        values.update(self.extra)
        return {name: _hparam_value(value) for name, value in values.items()}

    def _on_training_start(self) -> None:
        if self.model.num_timesteps > 0:
            return
        from stable_baselines3.common.logger import HParam

        self.logger.record("hparams", HParam(self.hyperparameters(),
                                             {name: 0.0 for name in HPARAM_METRICS}),
                           exclude=("stdout", "log", "json", "csv"))

    def _on_step(self) -> bool:
        return True

