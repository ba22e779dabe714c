"""Typed configuration of the warm-start training pipeline (``train/warmstart.py``).

The YAML file follows rl-baselines3-zoo: a top-level key per env id, and under it a ``default``
block plus optional named profiles that are merged over ``default``::

    LLMCluster-v0:
      default: {}
      heterogeneous:
        env_kwargs: {scenario: heterogeneous}
        temperature: {target_entropy: null, max_temperature: 3.0}

Every section is a frozen dataclass below, and **the dataclass defaults are the only place a
default lives**: the YAML states only what a profile changes, and every component takes its
section (``KLConfig``, ``TemperatureConfig``, ``BCConfig``...) rather than keeping defaults of
its own (``tests/test_config_defaults.py`` fails on a second default). Each section validates
its values once, in ``__post_init__``. Unknown keys and wrong types fail before any work,
naming the dotted key (see :mod:`llm_cluster_env.validation`). ``env_kwargs`` is resolved into
an :class:`~llm_cluster_env.config.EnvConfig` once, when the config is built
(:attr:`TrainingConfig.env`), and that object is what the environments, demonstrations and PPO
are made from.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm_cluster_env.config import EnvConfig
from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.tools.objectives import DEMO_OBJECTIVES
from llm_cluster_env.validation import ConfigError, deep_merge, from_dict, require, to_dict

ENV_ID = "LLMCluster-v0"
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class PPOConfig:
    """The PPO algorithm and its policy network.

    :param algorithm: ``ppo`` (KLPPO, a feed-forward policy) or ``recurrent_ppo``
        (KLRecurrentPPO, an LSTM or GRU policy; see ``recurrent_cell`` and ``sequence_length``).
    :param policy: ``replica_set`` (one network scores every replica, so one policy routes
        any number of replicas and any GPU mix: :mod:`sb3_warmstart.policies.replica_set`; needed to
        train across a scenario family) or ``mlp`` (SB3's ``MlpPolicy``/``MlpLstmPolicy``
        over the flat observation, tied to one replica count).
    :param n_envs: parallel environments (DummyVecEnv).
    :param n_steps: steps per environment per rollout.
    :param batch_size: minibatch size (steps). Recurrent PPO with ``sequence_length``: whole
        sequences are dealt to ``ceil(rollout / batch_size)`` minibatches of about this many
        steps; with ``sequence_length: null`` sb3-contrib cuts its sequences to fit.
    :param n_epochs: passes over each rollout.
    :param learning_rate: Adam step size (base value of the optional LR schedule).
    :param gamma: discount. :param gae_lambda: GAE lambda. :param clip_range: PPO clip.
    :param ent_coef: entropy coefficient after the warm-up.
    :param vf_coef: value-loss coefficient. :param max_grad_norm: global gradient-norm clip.
    :param target_kl: KL monitoring threshold (see ``kl.target_kl_early_stop``).
    :param net_arch: hidden layers of the actor and critic heads.
    :param lstm_hidden_size: units of the recurrent cell (LSTM or GRU).
    :param n_lstm_layers: stacked recurrent layers.
    :param recurrent_cell: ``lstm`` (sb3-contrib's ``MlpLstmPolicy``) or ``gru`` (the same
        policy with GRU cells, ``TemperatureMlpGruPolicy``), for the actor and the critic.
    :param sequence_length: recurrent PPO's training sequences, in steps: the rollout is cut
        at episode starts and every ``sequence_length`` steps, padded once per rollout, and each
        minibatch runs through the recurrent network in one call (gradients truncated at this
        length). ``null``: sb3-contrib's own minibatches (steps through the sequences one time
        step at a time; exactly stock RecurrentPPO with the extras off; ~5x slower to train).
    :param norm_reward: normalise rewards with VecNormalize.
    :param set_embed_dim: ``replica_set``: size of each replica's encoding.
    :param set_hidden_dim: ``replica_set``: hidden width of its encoder and heads.
    :param paired_baseline: a router name (any of ``llm_cluster_env.routing.registry``), or
        ``null``. When set, every training step's reward becomes the policy's reward minus the
        reward this router earns over the same step on a shadow copy of the episode (same
        cluster, same arrivals and lengths: common random numbers). The subtracted term does
        not depend on the policy's actions, so the optimum is unchanged, while the workload's
        noise shared by both copies cancels (``sb3_warmstart.pipeline.envs``).
    """

    algorithm: Literal["recurrent_ppo", "ppo"] = "ppo"
    policy: Literal["replica_set", "mlp"] = "replica_set"
    n_envs: int = 4
    n_steps: int = 128
    batch_size: int = 128
    n_epochs: int = 4
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = 0.05
    net_arch: tuple[int, ...] = (64, 64)
    lstm_hidden_size: int = 64
    n_lstm_layers: int = 1
    recurrent_cell: Literal["lstm", "gru"] = "lstm"
    sequence_length: int | None = 32
    norm_reward: bool = True
    set_embed_dim: int = 64
    set_hidden_dim: int = 64
    paired_baseline: str | None = None

    def __post_init__(self) -> None:
        if self.paired_baseline is not None:
            from llm_cluster_env.routing.registry import ALL_ROUTERS

            require(self.paired_baseline in ALL_ROUTERS, "paired_baseline", self.paired_baseline,
                    f"unknown router (known: {', '.join(ALL_ROUTERS)})")
        for name in ("n_envs", "n_steps", "n_epochs", "lstm_hidden_size", "n_lstm_layers",
                     "set_embed_dim", "set_hidden_dim"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.recurrent_cell in ("lstm", "gru"), "recurrent_cell", self.recurrent_cell,
                "must be 'lstm' or 'gru'")
        if self.sequence_length is not None:
            require(self.sequence_length >= 1, "sequence_length", self.sequence_length,
                    "must be >= 1 step or null")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        require(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        require(0 <= self.gae_lambda <= 1, "gae_lambda", self.gae_lambda, "must be in [0, 1]")
        require(self.clip_range > 0, "clip_range", self.clip_range, "must be > 0")
        require(all(w >= 1 for w in self.net_arch), "net_arch", self.net_arch,
                "layer widths must be >= 1")

    @property
    def recurrent(self) -> bool:
        return self.algorithm == "recurrent_ppo"

    @property
    def rollout_steps(self) -> int:
        """Env steps per rollout (all environments)."""
        return self.n_envs * self.n_steps

    @property
    def replica_set(self) -> bool:
        return self.policy == "replica_set"

    def policy_kwargs(self, layout=None) -> dict[str, Any]:
        """SB3 ``policy_kwargs`` of this architecture: ``MlpLstmPolicy``/``MlpPolicy``, or
        the replica-set policies, whose feature names come from the env's observation
        ``layout`` (an :class:`~llm_cluster_env.env.observation.ObservationLayout`)."""
        if self.replica_set:
            if layout is None:
                raise ValueError("ppo.policy='replica_set': policy_kwargs needs the env's "
                                 "observation layout")
            kwargs: dict[str, Any] = {
                "replica_features": list(layout.replica_features),
                "tail_features": list(layout.names[layout.replica_block:layout.history_offset]),
                "embed_dim": self.set_embed_dim, "hidden_dim": self.set_hidden_dim}
        else:
            kwargs = {"net_arch": {"pi": list(self.net_arch), "vf": list(self.net_arch)}}
        if self.recurrent:
            kwargs.update(lstm_hidden_size=self.lstm_hidden_size, n_lstm_layers=self.n_lstm_layers)
        return kwargs


@dataclass(frozen=True)
class KLConfig:
    """KL regularisation and entropy safeguards (see ``KLRegularisedMixin``).

    :param kl_ref_coef_initial: weight of KL(pi || pi_ref) at optimiser step 0.
    :param kl_ref_coef_final: weight after ``kl_ref_decay_steps`` optimiser (minibatch) steps.
    :param kl_ref_decay_steps: linear decay length, optimiser steps.
    :param kl_coef: instant KL penalty against the rollout policy.
    :param target_kl_early_stop: stop an update's epochs when approx_kl > 1.5 * target_kl
        (stock SB3 always does; here ``target_kl`` is otherwise only monitored).
    :param entropy_warmup_coef: entropy coefficient during the first ``warmup_steps``.
    :param warmup_steps: entropy warm-up length, optimiser steps.
    :param entropy_min: entropy floor (nats); ``None`` = no floor.
    :param entropy_floor_coef: weight of the hinge below the floor.
    """

    kl_ref_coef_initial: float = 0.5
    kl_ref_coef_final: float = 0.05
    kl_ref_decay_steps: int = 1500
    kl_coef: float = 0.1
    target_kl_early_stop: bool = False
    entropy_warmup_coef: float | None = 0.01
    warmup_steps: int = 200
    entropy_min: float | None = None
    entropy_floor_coef: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kl_ref_coef_initial", "kl_ref_coef_final", "kl_coef",
                     "entropy_floor_coef"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, value, "must be finite and >= 0")
        for name in ("kl_ref_decay_steps", "warmup_steps"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                    value, "must be an integer >= 0")

    @classmethod
    def disabled(cls) -> KLConfig:
        """No regularisation at all: the algorithm trains exactly like stock (Recurrent)PPO."""
        return cls(kl_ref_coef_initial=0.0, kl_ref_coef_final=0.0, kl_ref_decay_steps=0,
                   kl_coef=0.0, target_kl_early_stop=True, entropy_warmup_coef=None,
                   warmup_steps=0, entropy_min=None, entropy_floor_coef=0.0)

    def without_reference(self) -> KLConfig:
        """The same settings with the reference KL off (a cold start has no reference)."""
        return dataclasses.replace(self, kl_ref_coef_initial=0.0, kl_ref_coef_final=0.0)


@dataclass(frozen=True)
class WarmStartConfig:
    """Demonstrations and behaviour cloning before PPO (BC's hyperparameters: :class:`BCConfig`).

    :param enabled: warm start at all (False = cold-start PPO, no reference policy).
    :param demo_policies: router name -> weight of its share of the demonstrations.
    :param demo_steps: demonstration transitions (env steps) to collect.
    :param demo_episode_requests: episode length of the demonstration runs (requests).
    :param imbalance: also collect under alternating high/low load phases.
    :param validation_fraction: share of demo trajectories held out.
    :param value_pretraining: fit the critic on demo returns too.
    :param external_pretrain: a pretrained checkpoint (a ``sb3_warmstart.policies.policy_file``
        zip) to use instead of cloning from scratch; validated against the env, copied into the
        run folder.
    :param skip_bc_training: with ``external_pretrain``: use it as is (else BC fine-tunes it on
        fresh demos).
    :param demo_candidates: training across a family: the routers tried on every sampled
        scenario, in order of preference; the best one's episode is the demonstration
        (:mod:`sb3_warmstart.warmstart.family_demos`). ``demo_policies`` applies to one scenario.
    :param demo_margin: relative margin of ``demo_objective`` within which an earlier candidate
        counts as the best (keeps near-ties from switching the expert between similar scenarios).
    :param demo_objective: what the family's candidates are ranked by: ``mean_e2e`` or
        ``mean_ttft`` (a profile judged on first tokens).
    """

    enabled: bool = True
    demo_policies: dict[str, float] = field(default_factory=lambda: {"lor": 1.0})
    demo_candidates: tuple[str, ...] = ("least_added_time", "lor", "weighted_lor",
                                        "least_work_time", "llm_d")
    demo_margin: float = 0.005
    demo_objective: str = "mean_e2e"
    demo_steps: int = 16384
    demo_episode_requests: int = 256
    imbalance: bool = False
    validation_fraction: float = 0.2
    value_pretraining: bool = True
    external_pretrain: str | None = None
    skip_bc_training: bool = False

    def __post_init__(self) -> None:
        require(bool(self.demo_policies), "demo_policies", self.demo_policies,
                "needs at least one router")
        for name, weight in self.demo_policies.items():
            require(name in ROUTERS, "demo_policies", name,
                    f"unknown router (known: {', '.join(ROUTERS)})")
            require(weight > 0 and math.isfinite(weight), f"demo_policies.{name}", weight,
                    "weight must be > 0")
        require(bool(self.demo_candidates), "demo_candidates", self.demo_candidates,
                "needs at least one router")
        for name in self.demo_candidates:
            require(name in ROUTERS, "demo_candidates", name,
                    f"unknown router (known: {', '.join(ROUTERS)})")
            require(not ROUTERS[name].requires_context, "demo_candidates", name,
                    "needs the simulator's state; demonstrations come from routers that read "
                    "the observation")
        require(0.0 <= self.demo_margin < 1.0, "demo_margin", self.demo_margin,
                "must be in [0, 1)")
        require(self.demo_objective in DEMO_OBJECTIVES, "demo_objective",
                self.demo_objective, f"must be one of {DEMO_OBJECTIVES}")
        require(self.demo_steps >= 1, "demo_steps", self.demo_steps, "must be >= 1")
        require(self.demo_episode_requests >= 8, "demo_episode_requests",
                self.demo_episode_requests, "must be >= 8")
        require(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
                self.validation_fraction, "must be in [0, 1)")
        if self.skip_bc_training:
            require(self.external_pretrain is not None, "skip_bc_training", True,
                    "needs external_pretrain (there is nothing to skip BC for)")


@dataclass(frozen=True)
class BCConfig:
    """Behaviour cloning (:class:`sb3_warmstart.warmstart.bc.SequenceBC`). The network architecture is
    always the ``ppo`` section's, so the clone's weights are exactly PPO's policy.

    :param epochs: passes over the training trajectories.
    :param batch_size: sequences (lanes) per gradient step; the feed-forward path uses
        ``batch_size * sequence_length`` samples per step.
    :param sequence_length: truncated-BPTT chunk length (steps = routed requests).
    :param learning_rate: AdamW step size.
    :param weight_decay: AdamW decoupled weight decay.
    :param lr_schedule: ``constant``, or ``cosine`` (annealed per epoch to
        ``min_learning_rate``; on the default scenario it took lor's clone from 98.5% to 99.6%
        validation accuracy).
    :param min_learning_rate: final learning rate of the cosine schedule.
    :param ent_coef: weight of the entropy bonus (0 disables it).
    :param vf_coef: weight of the value regression term.
    :param max_grad_norm: gradient-norm clip, applied separately to the critic-only parameters
        and to all others (``None`` disables clipping).
    """

    epochs: int = 20
    batch_size: int = 16
    sequence_length: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_learning_rate: float = 1e-5
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "sequence_length"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
                self.learning_rate, "must be a finite number > 0")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate",
                self.min_learning_rate, f"must be in [0, learning_rate={self.learning_rate}]")
        require(self.lr_schedule in ("constant", "cosine"), "lr_schedule", self.lr_schedule,
                "must be 'constant' or 'cosine'")
        require(self.vf_coef >= 0, "vf_coef", self.vf_coef, "must be >= 0")
        require(self.ent_coef >= 0, "ent_coef", self.ent_coef, "must be >= 0")
        if self.max_grad_norm is not None:
            require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
                    "must be > 0 or null")


@dataclass(frozen=True)
class DistillationConfig:
    """DAgger after behaviour cloning (:mod:`sb3_warmstart.warmstart.dagger`; the measurements
    behind the defaults are in that module's docstring): the clone routes fresh episodes of the
    training scenarios, a teacher better than every heuristic labels every state it visits, and
    the clone is retrained on the labelled states, round after round; the last round's policy
    (``<run>/pretrained/distilled_policy.zip``) is what PPO starts from and is regularised
    towards. Runs only after a warm start that cloned demonstrations (not with
    ``warm_start.enabled: false`` or ``skip_bc_training``).

    :param enabled: distil at all (False: PPO starts from the clone, as before).
    :param teacher: the labelling router, any name of ``llm_cluster_env.routing.registry``
        (``lookahead`` simulates every replica per decision, ~1.5-5 ms; ``rollout_planner`` rolls
        the whole cluster out over sampled futures, ~20-30 ms, and cannot sample phased
        arrivals).
    :param rounds: DAgger rounds after the clone (each labels ``episodes_per_round`` episodes
        routed by the previous round's policy, then retrains).
    :param episodes_per_round: episodes routed and labelled per round (64: eight times the
        labels of 8 made the distilled policy 0.20% better on the held-out grid, on every
        training seed; the DAgger module's docstring).
    :param episode_requests: requests per DAgger episode.
    :param deterministic: the learner takes its most likely replica (True) or samples one.
    :param beta: probability, in round 1, of executing the teacher's action instead of the
        learner's, in [0, 1] (0: pure on-policy DAgger).
    :param beta_decay: ``beta`` is multiplied by this every further round, in [0, 1].
    :param fine_tune: every round starts from the previous round's weights (round 1 from the
        clone's) instead of fresh ones.
    :param include_demos: the heuristic demonstrations stay in every round's aggregate beside
        the teacher-labelled states.
    :param epochs: BC epochs of every round (``null``: ``bc.epochs``).
    :param alternative_teachers: routers that may label a training scenario instead of
        ``teacher``: before labelling an episode, ``teacher`` and each of these route that same
        episode alone, and the first of them (``teacher`` first) whose
        ``warm_start.demo_objective`` is within ``teacher_margin`` of the lowest labels it (the
        demonstrations' best-per-scenario rule, applied to the teacher). Empty: ``teacher``
        labels every episode.
    :param teacher_margin: relative margin within which an earlier teacher counts as the best
        of a scenario, in [0, 1).
    :param cost_temperature: where the labelling router gives a cost per replica
        (``lookahead``: the added request-seconds), BC learns from all of them instead of the
        cheapest alone: the target puts ``exp(-(c - c_min) / (cost_temperature * c_min))`` on
        each replica (normalised), so near-ties share the weight and costly mistakes weigh
        most. Relative to the best cost, >= 0; 0 learns the teacher's choice alone.
    """

    enabled: bool = True
    teacher: str = "lookahead"
    rounds: int = 3
    episodes_per_round: int = 64
    episode_requests: int = 512
    deterministic: bool = True
    beta: float = 0.0
    beta_decay: float = 1.0
    fine_tune: bool = True
    include_demos: bool = True
    epochs: int | None = 10
    alternative_teachers: tuple[str, ...] = ()
    teacher_margin: float = 0.005
    cost_temperature: float = 0.0

    def __post_init__(self) -> None:
        from llm_cluster_env.routing.registry import ALL_ROUTERS

        require(0.0 <= self.cost_temperature < float("inf"), "cost_temperature",
                self.cost_temperature, "must be a finite number >= 0")

        require(self.teacher in ALL_ROUTERS, "teacher", self.teacher,
                f"unknown router (known: {', '.join(ALL_ROUTERS)})")
        for name in self.alternative_teachers:
            require(name in ALL_ROUTERS, "alternative_teachers", name,
                    f"unknown router (known: {', '.join(ALL_ROUTERS)})")
        named = [self.teacher, *self.alternative_teachers]
        require(len(set(named)) == len(named), "alternative_teachers",
                list(self.alternative_teachers), "must not repeat a router or the teacher")
        require(0.0 <= self.teacher_margin < 1.0, "teacher_margin", self.teacher_margin,
                "must be in [0, 1)")
        for name in ("rounds", "episodes_per_round"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.episode_requests >= 8, "episode_requests", self.episode_requests,
                "must be >= 8")
        for name in ("beta", "beta_decay"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, name, value, "must be in [0, 1]")
        if self.epochs is not None:
            require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1 or null")


@dataclass(frozen=True)
class TemperatureConfig:
    """Temperature control (``sb3_warmstart.algorithms.callbacks.TemperatureController``, whose docstring
    gives the rule).

    :param enabled: use the controller.
    :param target_entropy: policy entropy the controller steers rollouts toward (nats). A good
        router is nearly deterministic given the state (a clone of ``lor`` has ~0.06 nats), so
        the default asks for a little exploration only; ``None`` = ``0.5 * ln(num_replicas)``,
        which drove a clone's rollouts to the temperature ceiling.
    :param target_balance: target balance score (``1 - std`` of the dispatch shares), (0, 1].
    :param adaptation_rate: step size of ``log T`` per rollout for unit error (>= 0).
    :param ema_decay: EMA decay per rollout, in [0, 1); 0.9 averages ~10 rollouts.
    :param entropy_weight: weight of the (``ln N``-normalised) entropy error (>= 0).
    :param balance_weight: weight of the balance error (>= 0).
    :param initial_temperature: temperature of the first rollout.
    :param min_temperature: lower bound of the adaptive temperature (> 0).
    :param max_temperature: upper bound of the adaptive temperature.
    :param collapse_balance: a rollout whose balance is below this collapses (0 disables).
    :param collapse_max_share: a rollout where one replica receives more than this share
        collapses, in (0, 1]; ``None`` = ``(1 + 1/N) / 2``.
    :param pulse_temperature: temperature during an exploration pulse (> 0).
    :param pulse_rollouts: length of a pulse in rollouts (0 disables pulses).
    :param pulse_cooldown: adaptive rollouts after a pulse that cannot trigger another.
    """

    enabled: bool = True
    target_entropy: float | None = 0.15
    target_balance: float = 0.95
    adaptation_rate: float = 0.1
    ema_decay: float = 0.9
    entropy_weight: float = 1.0
    balance_weight: float = 1.0
    initial_temperature: float = 1.0
    min_temperature: float = 0.5
    max_temperature: float = 2.0
    collapse_balance: float = 0.7
    collapse_max_share: float | None = None
    pulse_temperature: float = 5.0
    pulse_rollouts: int = 3
    pulse_cooldown: int = 2

    def __post_init__(self) -> None:
        if self.target_entropy is not None:
            require(math.isfinite(self.target_entropy) and self.target_entropy >= 0,
                    "target_entropy", self.target_entropy, "must be >= 0 nats or null")
        require(0 < self.target_balance <= 1, "target_balance", self.target_balance,
                "must be in (0, 1]")
        require(self.adaptation_rate >= 0, "adaptation_rate", self.adaptation_rate,
                "must be >= 0")
        require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "must be in [0, 1)")
        for name in ("entropy_weight", "balance_weight"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, value, "must be finite and >= 0")
        require(0 < self.min_temperature <= self.max_temperature < math.inf, "min_temperature",
                self.min_temperature, f"need 0 < min_temperature <= max_temperature="
                f"{self.max_temperature} < inf")
        require(self.min_temperature <= self.initial_temperature <= self.max_temperature,
                "initial_temperature", self.initial_temperature,
                f"must be in [{self.min_temperature}, {self.max_temperature}]")
        require(0 <= self.collapse_balance <= 1, "collapse_balance", self.collapse_balance,
                "must be in [0, 1]")
        if self.collapse_max_share is not None:
            require(0 < self.collapse_max_share <= 1, "collapse_max_share",
                    self.collapse_max_share, "must be in (0, 1]")
        require(math.isfinite(self.pulse_temperature) and self.pulse_temperature > 0,
                "pulse_temperature", self.pulse_temperature, "must be finite and > 0")
        for name in ("pulse_rollouts", "pulse_cooldown"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass(frozen=True)
class StabilizationConfig:
    """Normaliser stabilisation before any gradient step.

    :param stabilization_steps: env steps acted by a uniform-random router while VecNormalize
        statistics settle; optimiser updates are deferred until then (rounded up to rollouts).
    :param update_obs_stats: let observation statistics move. ``None``: yes for a cold start;
        no when warm-started, so the clone's inputs keep the meaning they had in BC.
    :param critic_warmup_steps: env steps after stabilisation in which the policy acts as
        usual but each update fits only the critic's own parameters to the returns (rounded
        up to rollouts; 0 = off): a warm-started critic was fitted to the demonstrations'
        rewards, which under ``ppo.paired_baseline`` are not the rewards PPO trains on, and
        its value loss would otherwise reach the actor through the shared features.
    """

    stabilization_steps: int = 1024
    update_obs_stats: bool | None = None
    critic_warmup_steps: int = 0

    def __post_init__(self) -> None:
        require(self.stabilization_steps >= 0, "stabilization_steps", self.stabilization_steps,
                "must be >= 0")
        require(self.critic_warmup_steps >= 0, "critic_warmup_steps", self.critic_warmup_steps,
                "must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    """Full-state checkpoints.

    :param checkpoint_interval: env steps between checkpoints (taken at rollout boundaries).
    :param max_checkpoints: newest checkpoints kept.
    """

    checkpoint_interval: int = 4096
    max_checkpoints: int = 3

    def __post_init__(self) -> None:
        require(self.checkpoint_interval >= 1, "checkpoint_interval", self.checkpoint_interval,
                "must be >= 1 step")
        require(self.max_checkpoints >= 1, "max_checkpoints", self.max_checkpoints,
                "must be >= 1")


@dataclass(frozen=True)
class LearningRateScheduleConfig:
    """``advanced_optimization.learning_rate_schedule``, stepped once per optimiser step by
    :func:`sb3_warmstart.algorithms.schedules.build_lr_scheduler` (torch's ``LinearLR`` warm-up, then
    ``CosineAnnealingWarmRestarts``; the formula is in that module's docstring).

    :param type: ``constant`` (SB3's own learning rate) or ``cosine_annealing_with_warmup``.
    :param warmup_steps: optimiser steps of linear warm-up (0 starts the cosine at once).
    :param min_lr_ratio: ``eta_min / lr``, the floor the cosine approaches, in [0, 1].
    :param restart_period: optimiser steps per cosine cycle (``T_0``).
    :param period_multiplier: growth of the period after each restart (``T_mult``).
    :param warmup_start_factor: the first warm-up step uses this fraction of the rate, (0, 1].
    """

    type: Literal["constant", "cosine_annealing_with_warmup"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    restart_period: int = 1000
    period_multiplier: int = 1
    warmup_start_factor: float = 1e-3

    def __post_init__(self) -> None:
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio,
                "must be in [0, 1]")
        for name, minimum in (("warmup_steps", 0), ("restart_period", 1),
                              ("period_multiplier", 1)):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                    name, value, f"must be an integer >= {minimum}")
        require(0.0 < self.warmup_start_factor <= 1.0, "warmup_start_factor",
                self.warmup_start_factor, "must be in (0, 1]")

    @property
    def enabled(self) -> bool:
        return self.type != "constant"


@dataclass(frozen=True)
class AdaptiveBatchSizeConfig:
    """``advanced_optimization.adaptive_batch_size``: minibatch size from the previous update's
    gradient norm (see ``KLRegularisedMixin``)."""

    enable: bool = False
    min_batch_size: int = 64
    max_batch_size: int = 256
    adaptation_rate: float = 0.1

    def __post_init__(self) -> None:
        require(2 <= self.min_batch_size <= self.max_batch_size, "min_batch_size",
                self.min_batch_size, f"must satisfy 2 <= min <= max_batch_size={self.max_batch_size}")
        require(0.0 <= self.adaptation_rate <= 1.0, "adaptation_rate", self.adaptation_rate,
                "must be in [0, 1]")


@dataclass(frozen=True)
class GradientOptimizationConfig:
    """``advanced_optimization.gradient_optimization``.

    :param accumulation_steps: minibatches averaged into one optimiser step.
    :param clip_by_global_norm: clip the accumulated gradient's global norm to
        ``ppo.max_grad_norm`` (False disables clipping).
    :param use_gradient_checkpointing: run each minibatch's actor-critic forward pass under
        ``torch.utils.checkpoint`` (activations recomputed in the backward pass instead of kept:
        memory for compute; the same losses and gradients).
    """

    accumulation_steps: int = 1
    clip_by_global_norm: bool = True
    use_gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        require(self.accumulation_steps >= 1, "accumulation_steps", self.accumulation_steps,
                "must be >= 1")


@dataclass(frozen=True)
class AdvancedOptimizationConfig:
    learning_rate_schedule: LearningRateScheduleConfig = field(
        default_factory=LearningRateScheduleConfig)
    adaptive_batch_size: AdaptiveBatchSizeConfig = field(default_factory=AdaptiveBatchSizeConfig)
    gradient_optimization: GradientOptimizationConfig = field(
        default_factory=GradientOptimizationConfig)


@dataclass(frozen=True)
class EvaluationConfig:
    """The final report: the trained policy against every heuristic on held-out seeds.

    :param episodes: paired episodes per held-out scenario (every router serves the same seeds;
        the report's 95% intervals are over these). :param seed: first held-out seed (training uses
        others). :param routers: heuristics to compare (empty = all).
    :param episode_requests: episode length for evaluation (None = the scenario's).
    :param env_overrides: ``env_kwargs`` fields replaced for evaluation only (one-scenario
        runs), e.g. ``{workload: {trace_rows: [8400, 12031]}}`` to evaluate on a part of a
        trace that training never replayed.
    """

    episodes: int = 10
    seed: int = 100_000
    routers: tuple[str, ...] = ()
    episode_requests: int | None = 1000
    env_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.episodes >= 1, "episodes", self.episodes, "must be >= 1")
        if self.env_overrides:
            require(isinstance(self.env_overrides, dict), "env_overrides", self.env_overrides,
                    "must be a mapping of env_kwargs fields")
        for name in self.routers:
            require(name in ROUTERS, "routers", name,
                    f"unknown router (known: {', '.join(ROUTERS)})")

    @property
    def router_names(self) -> tuple[str, ...]:
        return self.routers or tuple(ROUTERS)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything ``train/warmstart.py`` runs.

    :param seed: seeds demos, BC, PPO and the environments.
    :param family: train across this scenario family, a new scenario every episode
        (a packaged name from ``llm_cluster_env/families`` or a YAML path; see
        :mod:`llm_cluster_env.env.family`); ``None`` trains on ``env_kwargs`` alone.
    :param family_overrides: fields of the family replaced (``{replicas: [2, 8]}``).
    :param env_kwargs: ``LLMCluster-v0`` keyword arguments: the training scenario when
        ``family`` is ``None``.
    :param total_requests: PPO budget in env steps (routed requests), all environments.
    """

    seed: int = 0
    family: str | None = "generalist"
    family_overrides: dict[str, Any] = field(default_factory=dict)
    env_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "scenario": "a100x4_conv_70", "episode_requests": 512})
    total_requests: int = 98304
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    bc: BCConfig = field(default_factory=BCConfig)
    dagger: DistillationConfig = field(default_factory=DistillationConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    stabilization: StabilizationConfig = field(default_factory=StabilizationConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    advanced_optimization: AdvancedOptimizationConfig = field(
        default_factory=AdvancedOptimizationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        require(0 <= self.seed <= MAX_SEED, "seed", self.seed, f"must be in [0, {MAX_SEED}]")
        require(self.total_requests >= 1, "total_requests", self.total_requests,
                "must be >= 1 step")
        try:
            env = EnvConfig.from_kwargs(**self.env_kwargs)
        except ConfigError as err:
            raise ConfigError(f"env_kwargs.{err}") from None
        except TypeError as err:
            raise ConfigError(f"env_kwargs={self.env_kwargs!r}: {err}") from None
        object.__setattr__(self, "_env", env)  # built once; not a field (not compared, dumped)
        evaluation_env = env
        if self.evaluation.env_overrides:
            try:
                evaluation_env = EnvConfig.from_kwargs(
                    **deep_merge(self.env_kwargs, self.evaluation.env_overrides))
            except ConfigError as err:
                raise ConfigError(f"evaluation.env_overrides.{err}") from None
        object.__setattr__(self, "_evaluation_env", evaluation_env)
        family = None
        if self.family is not None:
            from llm_cluster_env.env.family import load_family

            try:
                family = load_family(self.family, self.family_overrides)
            except ConfigError as err:
                message = str(err).removeprefix("family.")
                raise ConfigError(f"family_overrides.{message}" if self.family_overrides
                                  else str(err)) from None
            require(self.ppo.replica_set, "ppo.policy", self.ppo.policy,
                    f"family={self.family!r} trains one policy on clusters of "
                    f"{family.replicas[0]}-{family.replicas[1]} replicas: use 'replica_set' "
                    "(or family: null to train on env_kwargs alone)")
        elif self.family_overrides:
            raise ConfigError(f"family_overrides={self.family_overrides!r}: needs a family")
        object.__setattr__(self, "_family", family)

    @property
    def env(self) -> EnvConfig:
        """The training environment's configuration, resolved once from ``env_kwargs`` (the
        scenario trained on when there is no family)."""
        return self._env  # type: ignore[attr-defined]

    @property
    def evaluation_env(self) -> EnvConfig:
        """The scenario the report evaluates on (``env`` with ``evaluation.env_overrides``)."""
        return self._evaluation_env  # type: ignore[attr-defined]

    @property
    def family_config(self):
        """The resolved :class:`~llm_cluster_env.env.family.ScenarioFamilyConfig`, or ``None``."""
        return self._family  # type: ignore[attr-defined]

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainingConfig:
        """A copy with ``overrides`` (nested dict) merged in and validated again."""
        return from_dict(TrainingConfig, merge_layer(to_dict(self), overrides), path="config")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def training_identity(self) -> dict[str, Any]:
        """Everything that changes what is trained: the resolved config less the sections that
        only say how the run is kept and reported (:data:`RUN_ONLY_SECTIONS`). Two configs with
        equal identities train bit-identical policies; a run folder belongs to one identity.
        A setting of :data:`ADDED_SETTINGS` at its listed value is left out.
        ``env`` is the resolved environment (so an edited scenario file counts as a change)."""
        identity = {k: v for k, v in to_dict(self).items() if k not in RUN_ONLY_SECTIONS}
        for path, legacy in ADDED_SETTINGS.items():
            section, key = path.split(".")
            if identity.get(section, {}).get(key, legacy) == legacy:
                identity[section].pop(key, None)
        identity["env"] = to_dict(self.env)
        if self.family_config is not None:
            identity["family"] = to_dict(self.family_config)
        return identity


#: Sections that do not change what is trained: where checkpoints go and how the final report
#: is evaluated. Changing them resumes the same run; changing anything else is another run.
RUN_ONLY_SECTIONS = ("checkpointing", "evaluation")
#: Largest seed: seeds feed NumPy's SeedSequence, torch and Python's ``random`` (all 64-bit).
MAX_SEED = 2**32 - 1


#: Settings added after run folders were made, each with the value that trains what those
#: runs trained. :meth:`TrainingConfig.training_identity` leaves such a setting out while it
#: holds that value, so older run folders, checkpoints and DAgger rounds still match (a
#: setting whose default changed what is trained, such as the ``dagger`` section, is not
#: listed).
ADDED_SETTINGS: Mapping[str, Any] = {"warm_start.demo_objective": "mean_e2e",
                                     "dagger.alternative_teachers": [],
                                     "dagger.teacher_margin": 0.005,
                                     "dagger.cost_temperature": 0.0,
                                     "stabilization.critic_warmup_steps": 0}


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                         prefix: str = "") -> list[str]:
    """``"key.path: <saved> -> <current>"`` for every leaf that differs between two
    :meth:`TrainingConfig.training_identity` dicts (empty when they are equal)."""
    out: list[str] = []
    for key in list(saved) + [k for k in current if k not in saved]:
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += identity_differences(a, b, f"{path}.")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


#: Free-form maps that a layer replaces rather than merges into (a profile naming its demo
#: policies means exactly those policies).
REPLACED_MAPS = (("warm_start", "demo_policies"),)


def merge_layer(base: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` merged over ``base`` key by key (sections and ``env_kwargs`` merge; the maps in
    :data:`REPLACED_MAPS` and all lists are replaced)."""
    merged = deep_merge(base, layer)
    for section, key in REPLACED_MAPS:
        block = layer.get(section)
        if isinstance(block, Mapping) and key in block:
            merged[section] = {**merged[section], key: block[key]}
    return merged


def _yaml():
    import yaml

    return yaml


def load_config(path: str | Path | None = None, profile: str = DEFAULT_PROFILE,
                overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
    """The config of ``profile`` in the YAML at ``path`` (``None``: the embedded defaults),
    merged over its ``default`` block, then ``overrides`` merged on top; validated.

    Layers, each merged over the previous one: the embedded defaults, the file's ``default``
    block, the profile, the overrides. The config (and its environment) is built once; only
    when that fails are the file's blocks checked one by one, so the error names the block it
    comes from.

    :raises ConfigError: naming the file, profile, dotted key and value.
    """
    blocks: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config={str(path)!r}: no such file")
        try:
            document = _yaml().safe_load(path.read_text()) or {}
        except _yaml().YAMLError as err:
            raise ConfigError(f"--config={str(path)!r}: not valid YAML: {err}") from None
        if not isinstance(document, dict) or ENV_ID not in document:
            raise ConfigError(f"--config={str(path)!r}: expected a top-level '{ENV_ID}:' key "
                              f"(found: {list(document) if isinstance(document, dict) else document!r})")
        unknown = [k for k in document if k != ENV_ID]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown env id (this pipeline trains {ENV_ID})")
        profiles = document[ENV_ID] or {}
        if not isinstance(profiles, dict):
            raise ConfigError(f"{ENV_ID}: expected a mapping of profiles")
        if profile not in profiles and profile != DEFAULT_PROFILE:
            raise ConfigError(f"--profile={profile!r}: not in {path} "
                              f"(profiles: {', '.join(profiles)})")
        for name in dict.fromkeys((DEFAULT_PROFILE, profile)):
            block = profiles.get(name) or {}
            if not isinstance(block, dict):
                raise ConfigError(f"{ENV_ID}.{name}: expected a mapping of settings")
            blocks.append((name, block))
    elif profile != DEFAULT_PROFILE:
        raise ConfigError(f"--profile={profile!r}: profiles live in a config file; pass "
                          "--config configs/warmstart.yaml (or another file) with it")
    data: dict[str, Any] = {}
    for _, block in blocks:
        data = merge_layer(data, block)
    if overrides:
        data = merge_layer(data, overrides)
    try:
        return from_dict(TrainingConfig, merge_layer(_defaults_dict(), data),
                         path=f"{ENV_ID}.{profile}")
    except ConfigError:
        for name, block in blocks:  # name the block the error comes from
            from_dict(TrainingConfig, merge_layer(_defaults_dict(), block),
                      path=f"{ENV_ID}.{name}")
        raise


def _key_field(key: str) -> tuple[type, dataclasses.Field, Any]:
    """The section class, field and resolved type of a dotted key (``ppo.algorithm``)."""
    cls: type = TrainingConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise KeyError(f"{key}: {part!r} is not a field of {cls.__name__}")
        hint = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return cls, fields[part], hint
        cls = hint


def describe_key(key: str) -> str:
    """The documentation of a dotted config key (``ppo.algorithm``, ``seed``): the text of its
    ``:param:`` entry in its section's docstring, on one line (``--help`` texts come from here,
    so they say what the code documents)."""
    cls, f, _ = _key_field(key)
    doc = inspect.getdoc(cls) or ""
    match = re.search(rf":param {re.escape(f.name)}:(.*?)(?=:param |\Z)", doc, re.S)
    if match is None:
        raise KeyError(f"{key}: {cls.__name__} documents no ':param {f.name}:'")
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", match.group(1))  # :mod:`x` -> x
    return " ".join(text.replace("``", "").split())


def key_choices(key: str) -> tuple[Any, ...] | None:
    """The values a ``Literal`` field allows (``None`` for other fields)."""
    hint = _key_field(key)[2]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def key_value(config: TrainingConfig, key: str) -> Any:
    """The value of a dotted key in ``config``."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _defaults_dict() -> dict[str, Any]:
    """The embedded defaults as plain data, read off the dataclass fields (the only place they
    live) without building a config, so the environment is resolved once per load."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingConfig):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = to_dict(value)
    return out


def dump_config_text(config: TrainingConfig, profile: str = DEFAULT_PROFILE) -> str:
    """The resolved config as a loadable YAML document."""
    return _yaml().safe_dump({ENV_ID: {profile: to_dict(config)}}, sort_keys=False)


def dump_config(config: TrainingConfig, path: str | Path, profile: str = DEFAULT_PROFILE) -> None:
    """Write the resolved config as a loadable YAML document (atomically)."""
    from llm_cluster_env.atomic import atomic_write_text

    atomic_write_text(path, dump_config_text(config, profile))


__all__ = ["ADDED_SETTINGS", "ConfigError", "TrainingConfig", "dump_config",
           "identity_differences", "load_config"]
