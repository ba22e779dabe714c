"""KL-regularised PPO and RecurrentPPO sharing one training loop.

:class:`KLRegularisedMixin` holds the loop (``train()``), the reference policy and every piece of
state our additions keep; :class:`KLPPO` (SB3 ``PPO``) and :class:`KLRecurrentPPO` (sb3-contrib
``RecurrentPPO``) only supply thin adapters: how a minibatch is evaluated (masks for padded
recurrent sequences) and where the reference logits of a minibatch come from.

Additions to PPO's clipped loss (all terms in :mod:`sb3_warmstart.algorithms.kl`):

* reference KL ``kl_ref_coef(t) * KL(pi || pi_ref)`` against a frozen copy of a policy given to
  :meth:`~KLRegularisedMixin.set_reference_policy`; the coefficient decays linearly from
  ``kl_ref_coef_initial`` to ``kl_ref_coef_final`` over ``kl_ref_decay_steps`` optimiser steps,
  ``t`` counted over all ``train()`` calls and resumes;
* the instant KL penalty ``kl_coef * mean(logp_old - logp_new).clamp(min=0)``;
* entropy warm-up (``entropy_warmup_coef`` replaces ``ent_coef`` for the first ``warmup_steps``
  optimiser steps) and an entropy floor ``entropy_floor_coef * relu(entropy_min - entropy)``;
* ``target_kl`` is monitored on every minibatch; the epoch loop stops early (as SB3 does) only
  with ``target_kl_early_stop=True``.

Optimisation options: a per-optimiser-step LR scheduler (:mod:`sb3_warmstart.algorithms.schedules`),
gradient accumulation with global-norm clipping of the accumulated gradient, an adaptive
minibatch size, gradient checkpointing (each minibatch's actor-critic forward runs under
``torch.utils.checkpoint``: its activations are recomputed during the backward pass instead of
kept; the same losses and gradients), ``updates_deferred`` (skip all gradient steps),
``critic_only_updates`` (fit the value head alone: the critic warm-up), and
``schedule_total_timesteps`` (SB3's progress-based schedules follow one global budget across
chunked ``learn()`` calls).

Recurrent minibatches: :class:`KLRecurrentPPO` keeps sb3-contrib's buffer by default
(``sequence_length=None``: the same minibatches and numbers as ``RecurrentPPO``, whose LSTM
steps through every minibatch that holds an episode start one time step at a time). With
``sequence_length=L`` it uses :class:`~sb3_warmstart.algorithms.recurrent_buffers.SequenceRolloutBuffer`:
the rollout is cut into sequences at episode starts and every ``L`` steps, padded once per
rollout, and each minibatch (whole sequences, shuffled by an explicit generator whose state is
part of the training state) runs through the recurrent network in one call.

The reference of :class:`KLRecurrentPPO` is recurrent and needs its own hidden states along the
rollout's sequences (the buffer's LSTM states are the learner's). At the start of each
``train()``, before the epochs, the frozen reference is run over the whole rollout in time
order, one sequence per env (``(n_steps, n_envs)`` observations and ``episode_starts``), starting
from its hidden state at the end of the previous rollout (reset where episodes start, exactly as
the learner's is). Its log-probabilities are stored per buffer entry in the rollout buffer
(:mod:`sb3_warmstart.algorithms.recurrent_buffers`), which pads them like every other per-step tensor and
returns them with each minibatch. The final reference state is carried to the next rollout and
is part of :meth:`~KLRegularisedMixin.get_training_state`. A reference set in the middle of an
episode starts from a zero state (it did not see the episode's beginning).

Units: steps are optimiser steps (one per minibatch, or one per ``gradient_accumulation_steps``
minibatches); KL values are in nats; batch sizes in transitions (feed-forward) or in buffer
entries before padding (recurrent).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3 import PPO
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.utils import explained_variance
from torch.utils.checkpoint import checkpoint

from sb3_warmstart.algorithms.kl import PPOLossTerms, masked_mean, ppo_loss_terms
from sb3_warmstart.algorithms.recurrent_buffers import (
    RefLogitsRecurrentRolloutBuffer,
    SequenceRolloutBuffer,
)
from sb3_warmstart.algorithms.schedules import EntropyCoefficient, LinearDecay, build_lr_scheduler
from sb3_warmstart.pipeline.config import AdvancedOptimizationConfig, KLConfig
from sb3_warmstart.policies.parameters import critic_only_parameters
from sb3_warmstart.policies.recurrent import (
    TemperatureMlpGruPolicy,
    TemperatureMlpLstmPolicy,
    TemperatureMlpPolicy,
    action_log_probs,
    distribution_log_probs,
)

TRAINING_STATE_KEYS = (
    "num_minibatch_steps",
    "reference_policy_state_dict",
    "reference_lstm_states",
    "lr_scheduler_state_dict",
    "batch_size",
    "grad_norm_reference",
    "updates_deferred",
    "minibatch_rng_state",
)
#: Keys a training state saved before they existed may lack (restored as "nothing to restore").
OPTIONAL_TRAINING_STATE_KEYS = ("minibatch_rng_state",)


#: The flat keyword form of :class:`KLConfig` (``KLPPO(..., kl_coef=0.1)``, RL Zoo YAMLs).
KL_KEYWORDS = tuple(f.name for f in dataclasses.fields(KLConfig))


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {requirement}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class KLRegularisedMixin:
    """The regularised PPO training loop and its state, shared by :class:`KLPPO` and
    :class:`KLRecurrentPPO` (put it first in the bases). Every argument of the wrapped algorithm
    is accepted and passed on; ours are keyword-only:

    :param kl: the regularisation (:class:`~sb3_warmstart.pipeline.config.KLConfig`, which documents and
        validates every knob: reference KL ``kl_ref_coef_initial -> kl_ref_coef_final`` over
        ``kl_ref_decay_steps`` optimiser steps, instant KL ``kl_coef``, ``target_kl_early_stop``,
        entropy warm-up and floor). Without a reference policy the reference term is skipped
        (with a warning if its coefficient > 0). ``None``: :meth:`KLConfig.disabled`, i.e. the
        stock algorithm.
    :param optimization: :class:`~sb3_warmstart.pipeline.config.AdvancedOptimizationConfig` (``None``:
        SB3's own optimisation):

        * ``learning_rate_schedule``: warm-up then cosine with restarts, stepped once per
          optimiser step from the base rate ``learning_rate`` (its value at progress 1 if a
          schedule). When enabled, SB3's per-``train()`` learning-rate update is disabled.
        * ``gradient_optimization.accumulation_steps``: minibatches whose gradients are averaged
          into one optimiser step. ``max_grad_norm`` clips the global norm of the averaged
          gradient right before the step. A partial group at the end of an epoch (or at an early
          stop) is applied as the mean of the minibatches it has.
        * ``gradient_optimization.use_gradient_checkpointing``: run each minibatch's forward
          pass (features, recurrent network, heads, distribution) under non-reentrant
          ``torch.utils.checkpoint``: only its inputs are kept for the backward pass, which
          runs the forward again. Memory for compute; losses and gradients are unchanged.
        * ``adaptive_batch_size``: with ``enable``, after each update with mean pre-clip
          gradient norm ``g``: ``b <- clip(b * (g_ref / g) ** r, min, max)``, then
          ``g_ref <- (1 - r) * g_ref + r * g`` (``r = adaptation_rate``; ``g_ref`` starts at the
          first ``g``; ``b`` is kept as a float and rounded when used). A larger norm than the
          running reference gives a smaller batch, a smaller norm a larger one.
    :param schedule_total_timesteps: when set, ``_current_progress_remaining`` (which drives SB3's
        learning-rate and clip-range schedules) is ``1 - num_timesteps / schedule_total_timesteps``
        instead of using each ``learn()`` call's total, so chunked ``learn(...,
        reset_num_timesteps=False)`` calls follow the schedules of one uninterrupted run.
    :param init_policy: path of a policy file written by the behaviour-cloning stage
        (:func:`sb3_warmstart.policies.policy_file.save_pretrained`, e.g. ``run/bc.zip``) to
        start from: it is validated against the env (observation shape and schema, action
        count), its weights are loaded into the freshly built policy (same policy class and
        architecture, else a ``ValueError`` naming the file), its observation statistics into
        the env's ``VecNormalize`` (so the env must normalise observations exactly when the
        policy was cloned on normalised ones), and, when the reference KL is on
        (``kl_ref_coef_initial`` or ``kl_ref_coef_final`` > 0), it becomes the reference policy.
        Applied once, at construction (``load()`` restores the trained weights instead).

    The KL settings can also be given flat, one keyword per :class:`KLConfig` field (what RL
    Zoo's YAML files pass), instead of ``kl``; the fields not given keep the values of
    :meth:`KLConfig.disabled` (off), and :class:`KLConfig` validates them:

    :param kl_ref_coef_initial: weight of ``KL(pi || pi_ref)`` at optimiser step 0.
    :param kl_ref_coef_final: its weight after ``kl_ref_decay_steps`` optimiser steps.
    :param kl_ref_decay_steps: length of its linear decay, optimiser steps.
    :param kl_coef: weight of the instant KL penalty against the rollout policy.
    :param target_kl_early_stop: stop an update's epochs when ``approx_kl > 1.5 * target_kl``.
    :param entropy_warmup_coef: entropy coefficient during the first ``warmup_steps``.
    :param warmup_steps: entropy warm-up length, optimiser steps.
    :param entropy_min: entropy floor (nats); ``None`` = no floor.
    :param entropy_floor_coef: weight of the hinge below the floor.

    The component reads its settings from ``self.kl`` and ``self.optimization`` (saved with the
    model).
    """

    def __init__(
        self,
        policy: str | type[BasePolicy],
        env: Any,
        *,
        kl: KLConfig | None = None,
        optimization: AdvancedOptimizationConfig | None = None,
        schedule_total_timesteps: int | None = None,
        init_policy: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        flat = {name: kwargs.pop(name) for name in KL_KEYWORDS if name in kwargs}
        if flat and kl is not None:
            raise TypeError(f"kl=KLConfig(...) and {', '.join(sorted(flat))}: give the KL "
                            f"settings one way, not both")
        if flat:
            kl = dataclasses.replace(KLConfig.disabled(), **flat)
        kl = KLConfig.disabled() if kl is None else kl
        optimization = AdvancedOptimizationConfig() if optimization is None else optimization
        if not isinstance(kl, KLConfig):
            raise TypeError(f"kl: expected a KLConfig, got {type(kl).__name__}")
        if not isinstance(optimization, AdvancedOptimizationConfig):
            raise TypeError(f"optimization: expected an AdvancedOptimizationConfig, got "
                            f"{type(optimization).__name__}")
        _check("schedule_total_timesteps", schedule_total_timesteps,
               schedule_total_timesteps is None or (_is_int(schedule_total_timesteps)
                                                    and schedule_total_timesteps > 0),
               "must be None or an integer > 0")
        self.kl = kl
        self.optimization = optimization
        self.schedule_total_timesteps = schedule_total_timesteps
        self.init_policy = None if init_policy is None else os.fspath(init_policy)
        #: When True, ``train()`` takes no gradient step (it logs ``train/updates_deferred``).
        self.updates_deferred = False
        #: When True, ``train()`` fits only the critic-only parameters to the rollout's returns
        #: (:meth:`_train_critic_only`); the actor and every schedule stay where they are.
        self.critic_only_updates = False
        #: Frozen eval-mode copy of the reference policy, or None. Not an optimiser parameter.
        self.reference_policy: BasePolicy | None = None
        self._reference_lstm_states: tuple[th.Tensor, th.Tensor] | None = None
        self._lr_scheduler: th.optim.lr_scheduler.LRScheduler | None = None
        self._num_minibatch_steps = 0
        self._adaptive_batch_size: float | None = None
        self._grad_norm_reference: float | None = None
        #: Shuffles recurrent sequences into minibatches (KLRecurrentPPO with sequence_length).
        self._minibatch_rng: np.random.Generator | None = None
        self._warned_no_reference = False
        super().__init__(policy, env, **kwargs)  # type: ignore[call-arg]
        if self.init_policy is not None:
            if not kwargs.get("_init_setup_model", True):
                raise ValueError(f"init_policy={self.init_policy!r}: needs the model set up "
                                 f"(_init_setup_model=True)")
            self._load_init_policy(self.init_policy)

    def _load_init_policy(self, path: str) -> None:
        """Start from the cloned policy file ``path`` (see ``init_policy``)."""
        from sb3_warmstart.policies.policy_file import (
            load_pretrained,
            obs_normalizer_from_metadata,
            validate_pretrained,
        )

        validate_pretrained(path, self.env)  # type: ignore[attr-defined]
        cloned, meta, _ = load_pretrained(path, device=str(self.device))  # type: ignore[attr-defined]
        if type(cloned.policy) is not type(self.policy):  # type: ignore[attr-defined]
            raise ValueError(f"init_policy={path!r}: holds a {type(cloned.policy).__name__}, this "
                             f"model's policy is {type(self.policy).__name__} (set policy to "
                             f"match)")  # type: ignore[attr-defined]
        try:
            self.policy.load_state_dict(cloned.policy.state_dict(), strict=True)  # type: ignore[attr-defined]
        except RuntimeError as exc:
            raise ValueError(f"init_policy={path!r}: its architecture differs from this model's "
                             f"policy_kwargs: {exc}") from exc
        normalizer = obs_normalizer_from_metadata(meta)
        vec_normalize = self.get_vec_normalize_env()  # type: ignore[attr-defined]
        normalises = vec_normalize is not None and vec_normalize.norm_obs
        if (normalizer is not None) != normalises:
            raise ValueError(
                f"init_policy={path!r}: the policy was cloned on "
                f"{'normalised' if normalizer is not None else 'raw'} observations but the env "
                f"{'normalises' if normalises else 'does not normalise'} them (RL Zoo: "
                f"normalize: {'true' if normalizer is not None else 'false'})")
        if normalizer is not None:
            vec_normalize.obs_rms = copy.deepcopy(normalizer.obs_rms)
            vec_normalize.clip_obs = normalizer.clip_obs
            vec_normalize.epsilon = normalizer.epsilon
        if self.kl.kl_ref_coef_initial > 0 or self.kl.kl_ref_coef_final > 0:
            self.set_reference_policy(cloned.policy)

    # ------------------------------------------------------------------ setup and schedules
    def _setup_model(self) -> None:
        super()._setup_model()  # type: ignore[misc]
        self._setup_rollout_buffer()
        adaptive = self.optimization.adaptive_batch_size
        if adaptive.enable:
            _check("batch_size", self.batch_size,  # type: ignore[attr-defined]
                   _is_int(self.batch_size)  # type: ignore[attr-defined]
                   and adaptive.min_batch_size <= self.batch_size <= adaptive.max_batch_size,  # type: ignore[attr-defined,operator]
                   f"must be an integer in [min_batch_size={adaptive.min_batch_size}, "
                   f"max_batch_size={adaptive.max_batch_size}] with adaptive batch sizes")
        self._lr_scheduler = None
        schedule = self.optimization.learning_rate_schedule
        if schedule.enabled:
            self._lr_scheduler = build_lr_scheduler(self.policy.optimizer,  # type: ignore[attr-defined]
                                                    schedule)

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        if self.schedule_total_timesteps is not None:
            total_timesteps = self.schedule_total_timesteps
        super()._update_current_progress_remaining(num_timesteps, total_timesteps)  # type: ignore[misc]

    def dump_logs(self, iteration: int = 0) -> None:
        """SB3's per-rollout dump, with ``time/iterations`` counted in rollouts since step 0
        rather than since this ``learn()`` call, so a resumed run logs the rows an
        uninterrupted run logs."""
        rollout = self.n_steps * self.n_envs  # type: ignore[attr-defined]
        super().dump_logs(self.num_timesteps // rollout if iteration > 0 else 0)  # type: ignore[misc]

    @property
    def num_minibatch_steps(self) -> int:
        """Optimiser steps taken by ``train()`` so far, across calls and resumes (the step
        counter of the KL decay, the entropy warm-up and the LR scheduler)."""
        return self._num_minibatch_steps

    def kl_ref_coef_at(self, step: int | None = None) -> float:
        """Scheduled reference-KL coefficient at optimiser step ``step`` (default: the next)."""
        kl = self.kl
        schedule = LinearDecay(kl.kl_ref_coef_initial, kl.kl_ref_coef_final,
                               kl.kl_ref_decay_steps)
        return schedule(self._num_minibatch_steps if step is None else step)

    def entropy_coef_at(self, step: int | None = None) -> float:
        """Entropy coefficient at optimiser step ``step`` (default: the next)."""
        schedule = EntropyCoefficient(self.ent_coef, self.kl.entropy_warmup_coef,  # type: ignore[attr-defined]
                                      self.kl.warmup_steps)
        return schedule(self._num_minibatch_steps if step is None else step)

    @property
    def current_batch_size(self) -> int | None:
        """The minibatch size the next update uses."""
        if not self.optimization.adaptive_batch_size.enable or self._adaptive_batch_size is None:
            return self.batch_size  # type: ignore[attr-defined]
        return int(round(self._adaptive_batch_size))

    def _adapt_batch_size(self, grad_norm: float) -> None:
        """Apply the rule documented in the class docstring after an update."""
        adaptive = self.optimization.adaptive_batch_size
        if not adaptive.enable or not np.isfinite(grad_norm) or grad_norm <= 0.0:
            return
        if self._adaptive_batch_size is None:
            self._adaptive_batch_size = float(self.batch_size)  # type: ignore[attr-defined]
        if self._grad_norm_reference is None:
            self._grad_norm_reference = grad_norm
            return
        rate = adaptive.adaptation_rate
        size = self._adaptive_batch_size * (self._grad_norm_reference / grad_norm) ** rate
        self._adaptive_batch_size = float(np.clip(size, adaptive.min_batch_size,
                                                  adaptive.max_batch_size))
        self._grad_norm_reference = (1.0 - rate) * self._grad_norm_reference + rate * grad_norm

    # ------------------------------------------------------------------ reference policy
    def set_reference_policy(self, policy: BasePolicy | None) -> None:
        """Freeze a copy of ``policy`` as the reference of the KL term (None removes it).

        The copy has gradients off, is in eval mode, is not in any optimiser, and samples at
        ``temperature = 1`` with ``uniform_actions = False`` whatever the original's settings.
        """
        if policy is None:
            self.reference_policy = None
            self._reference_lstm_states = None
            return
        self._check_reference_policy(policy)
        if not isinstance(self.action_space, spaces.Discrete):  # type: ignore[attr-defined]
            raise ValueError(f"action_space={self.action_space}: the reference KL needs a "  # type: ignore[attr-defined]
                             f"Discrete action space")
        if policy.action_space != self.action_space:  # type: ignore[attr-defined]
            raise ValueError(f"policy.action_space={policy.action_space}: differs from the "
                             f"model's {self.action_space}")  # type: ignore[attr-defined]
        if policy.observation_space.shape != self.observation_space.shape:  # type: ignore[attr-defined]
            raise ValueError(f"policy.observation_space={policy.observation_space}: differs from "
                             f"the model's {self.observation_space}")  # type: ignore[attr-defined]
        reference = copy.deepcopy(policy)
        reference.optimizer = None  # type: ignore[assignment]
        if hasattr(reference, "temperature"):
            reference.temperature = 1.0
        if hasattr(reference, "uniform_actions"):
            reference.uniform_actions = False
        reference = reference.to(self.device)  # type: ignore[attr-defined]
        reference.set_training_mode(False)
        reference.requires_grad_(False)
        self.reference_policy = reference
        self._reference_lstm_states = self._initial_reference_state(reference)

    # adapters (overridden by KLPPO / KLRecurrentPPO) -----------------------------------
    def _setup_rollout_buffer(self) -> None:
        """Replace the rollout buffer if the algorithm needs one that carries reference logits."""

    def _check_reference_policy(self, policy: BasePolicy) -> None:
        raise NotImplementedError

    def _initial_reference_state(self, reference: BasePolicy) -> tuple[th.Tensor, th.Tensor] | None:
        return None

    def _prepare_reference(self) -> None:
        """Per-rollout reference work, run once at the start of ``train()``."""

    def _evaluate_minibatch(
        self, rollout_data: Any, actions: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None]:
        """``(values, log_prob, entropy, mask)`` of a minibatch (mask None = all valid)."""
        raise NotImplementedError

    def _minibatch_reference_logits(self, rollout_data: Any) -> th.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ training loop
    def _forward_minibatch(
        self, rollout_data: Any, actions: th.Tensor, with_logits: bool
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None, th.Tensor | None]:
        """``(values, log_prob, entropy, mask, logits)`` of a minibatch; ``logits`` (the
        current policy's normalised logits) only ``with_logits``, else None. Runs under
        ``torch.utils.checkpoint`` when ``use_gradient_checkpointing``."""

        def forward():
            values, log_prob, entropy, mask = self._evaluate_minibatch(rollout_data, actions)
            # the distribution evaluate_actions just built (SB3 keeps it on the policy)
            logits = (distribution_log_probs(self.policy.action_dist)  # type: ignore[attr-defined]
                      if with_logits else None)
            return values, log_prob, entropy, mask, logits

        if not self.optimization.gradient_optimization.use_gradient_checkpointing:
            return forward()
        return checkpoint(forward, use_reentrant=False)

    def _optimizer_step(self, n_minibatches: int) -> tuple[float, float]:
        """Average the accumulated gradient over ``n_minibatches``, clip its global norm, step.

        :return: ``(pre-clip global gradient norm, learning rate used)``.
        """
        policy = self.policy  # type: ignore[attr-defined]
        if n_minibatches > 1:
            for param in policy.parameters():
                if param.grad is not None:
                    param.grad.div_(n_minibatches)
        # Clip grad norm
        grad_norm = th.nn.utils.clip_grad_norm_(policy.parameters(), self.max_grad_norm)  # type: ignore[attr-defined]
        lr = float(policy.optimizer.param_groups[0]["lr"])
        policy.optimizer.step()
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        self._num_minibatch_steps += 1
        return float(grad_norm), lr

    def train(self) -> None:
        """Update the policy on the gathered rollout buffer.

        The loop is copied from ``train()`` of SB3 2.9.2 ``PPO`` / sb3-contrib 2.9.2
        ``RecurrentPPO`` (identical but for the masks, which the adapters supply); the loss is
        :func:`sb3_warmstart.algorithms.kl.ppo_loss_terms`. Our additions: reference preparation, deferral,
        the LR scheduler, step-indexed coefficients, optional early stop, gradient accumulation,
        adaptive batch size and the extra logs.
        """
        # Switch to train mode (this affects batch norm / dropout)
        self.policy.set_training_mode(True)  # type: ignore[attr-defined]
        self._prepare_reference()
        self.logger.record("train/updates_deferred", float(self.updates_deferred))  # type: ignore[attr-defined]
        if self.updates_deferred:
            return
        self.logger.record("train/critic_only", float(self.critic_only_updates))  # type: ignore[attr-defined]
        if self.critic_only_updates:
            self._train_critic_only()
            return
        if self._lr_scheduler is None:
            # Update optimizer learning rate
            self._update_learning_rate(self.policy.optimizer)  # type: ignore[attr-defined]
        # Compute current clip range
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[attr-defined]
        # Optional: clip range for the value function
        if self.clip_range_vf is not None:  # type: ignore[attr-defined]
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[attr-defined]

        reference = self.reference_policy is not None
        kl = self.kl
        accumulation_steps = self.optimization.gradient_optimization.accumulation_steps
        if not reference and kl.kl_ref_coef_initial > 0 and not self._warned_no_reference:
            warnings.warn(f"kl_ref_coef_initial={kl.kl_ref_coef_initial} but no reference "
                          f"policy is set: the reference KL term is skipped", stacklevel=2)
            self._warned_no_reference = True
        batch_size = self.current_batch_size
        records: dict[str, list[float]] = defaultdict(list)
        grad_norms: list[float] = []
        lrs: list[float] = []
        target_kl_exceeded = False
        continue_training = True

        # train for n_epochs epochs
        for epoch in range(self.n_epochs):  # type: ignore[attr-defined]
            approx_kl_divs = []
            pending = 0  # minibatches whose gradients wait for an optimiser step
            # Do a complete pass on the rollout buffer
            for rollout_data in self.rollout_buffer.get(batch_size):  # type: ignore[attr-defined]
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):  # type: ignore[attr-defined]
                    # Convert discrete action from float to long
                    actions = rollout_data.actions.long().flatten()

                values, log_prob, entropy, mask, logits = self._forward_minibatch(
                    rollout_data, actions, with_logits=reference)
                values = values.flatten()
                if self.clip_range_vf is None:  # type: ignore[attr-defined]
                    # No clipping
                    values_pred = values
                else:
                    # Clip the difference between old and new value
                    # NOTE: this depends on the reward scaling
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf)

                ref_logits = self._minibatch_reference_logits(rollout_data) if reference else None
                step = self._num_minibatch_steps
                terms: PPOLossTerms = ppo_loss_terms(
                    log_prob=log_prob,
                    old_log_prob=rollout_data.old_log_prob,
                    advantages=rollout_data.advantages,
                    values_pred=values_pred,
                    returns=rollout_data.returns,
                    entropy=entropy,
                    clip_range=clip_range,
                    ent_coef=self.entropy_coef_at(step),
                    vf_coef=self.vf_coef,  # type: ignore[attr-defined]
                    normalize_advantage=self.normalize_advantage,  # type: ignore[attr-defined]
                    mask=mask,
                    logits=logits,
                    ref_logits=ref_logits,
                    kl_ref_coef=self.kl_ref_coef_at(step) if reference else 0.0,
                    kl_coef=kl.kl_coef,
                    entropy_min=kl.entropy_min,
                    entropy_floor_coef=kl.entropy_floor_coef,
                )
                for key, value in terms.to_floats().items():
                    records[key].append(value)
                approx_kl_div = records["approx_kl"][-1]
                approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:  # type: ignore[attr-defined]
                    target_kl_exceeded = True
                    if kl.target_kl_early_stop:
                        continue_training = False
                        if self.verbose >= 1:  # type: ignore[attr-defined]
                            print(f"Early stopping at step {epoch} due to reaching max kl: "
                                  f"{approx_kl_div:.2f}")
                        break

                # Optimization step (every gradient_accumulation_steps minibatches)
                if pending == 0:
                    self.policy.optimizer.zero_grad()  # type: ignore[attr-defined]
                terms.total.backward()
                pending += 1
                if pending == accumulation_steps:
                    grad_norm, lr = self._optimizer_step(pending)
                    grad_norms.append(grad_norm)
                    lrs.append(lr)
                    pending = 0
            if pending:
                grad_norm, lr = self._optimizer_step(pending)
                grad_norms.append(grad_norm)
                lrs.append(lr)

            self._n_updates += 1  # type: ignore[attr-defined]
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(),  # type: ignore[attr-defined]
                                           self.rollout_buffer.returns.flatten())  # type: ignore[attr-defined]
        mean_grad_norm = float(np.mean(grad_norms)) if grad_norms else float("nan")
        self._adapt_batch_size(mean_grad_norm)

        # Logs: means over the update's minibatches, approx_kl over the last epoch (as SB3)
        logger = self.logger  # type: ignore[attr-defined]
        for key, series in records.items():
            logger.record(f"train/{key}", float(np.mean(series)))
        logger.record("train/approx_kl", float(np.mean(approx_kl_divs)))
        logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):  # type: ignore[attr-defined]
            logger.record("train/std", th.exp(self.policy.log_std).mean().item())  # type: ignore[attr-defined]
        logger.record("train/n_updates", self._n_updates, exclude="tensorboard")  # type: ignore[attr-defined]
        logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:  # type: ignore[attr-defined]
            logger.record("train/clip_range_vf", clip_range_vf)
        if self._lr_scheduler is not None:  # else SB3's _update_learning_rate logged it
            logger.record("train/learning_rate", lrs[-1] if lrs
                          else float(self.policy.optimizer.param_groups[0]["lr"]))  # type: ignore[attr-defined]
        logger.record("train/grad_norm", mean_grad_norm)
        logger.record("train/batch_size", batch_size)
        if self._grad_norm_reference is not None:
            logger.record("train/grad_norm_reference", self._grad_norm_reference)
        logger.record("train/early_stop", float(not continue_training))
        logger.record("train/target_kl_exceeded", float(target_kl_exceeded))
        logger.record("train/minibatch_steps", self._num_minibatch_steps)

    def _train_critic_only(self) -> None:
        """The critic warm-up's update: ``n_epochs`` passes over the rollout's minibatches of
        squared error between the value prediction and the GAE returns, stepping only
        :func:`~sb3_warmstart.policies.parameters.critic_only_parameters` (clipped to
        ``max_grad_norm``). The actor, the shared features extractor, the optimiser-step
        counter (KL decay, entropy warm-up, LR scheduler) and the adaptive batch size are left
        as they are, so the policy acts exactly as before and its schedules start with its
        first update.

        :raises ValueError: the policy has no critic-only parameters (nothing could be fitted
            without moving the actor).
        """
        policy = self.policy  # type: ignore[attr-defined]
        critic = critic_only_parameters(policy)
        if not critic:
            raise ValueError(f"critic warm-up: {type(policy).__name__} has no critic-only "
                             f"parameters (its value head shares every weight with the actor)")
        critic_ids = {id(p) for p in critic}
        losses: list[float] = []
        for _ in range(self.n_epochs):  # type: ignore[attr-defined]
            for rollout_data in self.rollout_buffer.get(self.current_batch_size):  # type: ignore[attr-defined]
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):  # type: ignore[attr-defined]
                    actions = rollout_data.actions.long().flatten()
                values, _, _, mask, _ = self._forward_minibatch(rollout_data, actions,
                                                                with_logits=False)
                loss = masked_mean((rollout_data.returns - values.flatten()) ** 2, mask)
                policy.optimizer.zero_grad()
                loss.backward()
                for param in policy.parameters():
                    if id(param) not in critic_ids:
                        param.grad = None  # Adam skips parameters without a gradient
                th.nn.utils.clip_grad_norm_(critic, self.max_grad_norm)  # type: ignore[attr-defined]
                policy.optimizer.step()
                losses.append(float(loss.item()))
        self._n_updates += self.n_epochs  # type: ignore[attr-defined]
        logger = self.logger  # type: ignore[attr-defined]
        logger.record("train/value_loss", float(np.mean(losses)) if losses else float("nan"))
        logger.record("train/explained_variance", explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()))  # type: ignore[attr-defined]
        logger.record("train/n_updates", self._n_updates, exclude="tensorboard")  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ state
    def get_training_state(self) -> dict[str, Any]:
        """Everything our additions keep that SB3's ``save()`` does not restore by itself.

        Keys: ``num_minibatch_steps``, ``reference_policy_state_dict`` (CPU tensors or None),
        ``reference_lstm_states`` (``(h, c)`` CPU tensors or None), ``lr_scheduler_state_dict``,
        ``batch_size`` (the adaptive size as a float, or None), ``grad_norm_reference``,
        ``updates_deferred``, ``minibatch_rng_state`` (the bit-generator state of the generator
        that shuffles recurrent sequences, or None). The values are copies.
        """
        ref_sd = None
        if self.reference_policy is not None:
            ref_sd = {k: v.detach().cpu().clone()
                      for k, v in self.reference_policy.state_dict().items()}
        ref_states = None
        if self._reference_lstm_states is not None:
            ref_states = tuple(s.detach().cpu().clone() for s in self._reference_lstm_states)
        return {
            "num_minibatch_steps": self._num_minibatch_steps,
            "reference_policy_state_dict": ref_sd,
            "reference_lstm_states": ref_states,
            "lr_scheduler_state_dict": (None if self._lr_scheduler is None
                                        else copy.deepcopy(self._lr_scheduler.state_dict())),
            "batch_size": self._adaptive_batch_size,
            "grad_norm_reference": self._grad_norm_reference,
            "updates_deferred": self.updates_deferred,
            "minibatch_rng_state": (None if self._minibatch_rng is None
                                    else copy.deepcopy(self._minibatch_rng.bit_generator.state)),
        }

    def set_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_training_state` output. The policy and optimiser come from SB3's
        ``load``/``set_parameters`` (before or after this call): the LR scheduler continues from
        the optimiser's restored LR.

        Without a reference policy in place, the saved reference weights are loaded into a copy
        of the learner's policy (so the reference must then share its architecture; otherwise
        call :meth:`set_reference_policy` with a policy of the right architecture first).
        """
        missing = [k for k in TRAINING_STATE_KEYS
                   if k not in state and k not in OPTIONAL_TRAINING_STATE_KEYS]
        unknown = [k for k in state if k not in TRAINING_STATE_KEYS]
        if missing or unknown:
            raise ValueError(f"training state: missing keys {missing}, unknown keys {unknown}")
        steps = state["num_minibatch_steps"]
        _check("num_minibatch_steps", steps, _is_int(steps) and steps >= 0, "must be an int >= 0")

        ref_sd = state["reference_policy_state_dict"]
        if ref_sd is None:
            self.set_reference_policy(None)
        else:
            if self.reference_policy is None:
                self.set_reference_policy(self.policy)  # type: ignore[attr-defined]
            assert self.reference_policy is not None
            self.reference_policy.load_state_dict(ref_sd)
            ref_states = state["reference_lstm_states"]
            expected = self._reference_lstm_states
            if (ref_states is None) != (expected is None) or (
                    expected is not None and [tuple(s.shape) for s in ref_states]
                    != [tuple(s.shape) for s in expected]):
                raise ValueError(
                    f"reference_lstm_states: shapes {None if ref_states is None else [tuple(s.shape) for s in ref_states]} "
                    f"do not match the reference's {None if expected is None else [tuple(s.shape) for s in expected]}")
            if ref_states is not None:
                self._reference_lstm_states = tuple(
                    s.to(self.device).clone() for s in ref_states)  # type: ignore[attr-defined]

        sched_sd = state["lr_scheduler_state_dict"]
        if sched_sd is not None and self._lr_scheduler is None:
            raise ValueError("lr_scheduler_state_dict: the state has an LR scheduler but this "
                             "model has none (optimization.learning_rate_schedule disabled)")
        if self._lr_scheduler is not None:
            if sched_sd is None:
                warnings.warn("lr_scheduler_state_dict is None: the LR schedule starts from "
                              "step 0", stacklevel=2)
            else:
                self._lr_scheduler.load_state_dict(copy.deepcopy(sched_sd))

        self._num_minibatch_steps = int(steps)
        self._adaptive_batch_size = (None if state["batch_size"] is None
                                     else float(state["batch_size"]))
        self._grad_norm_reference = (None if state["grad_norm_reference"] is None
                                     else float(state["grad_norm_reference"]))
        self.updates_deferred = bool(state["updates_deferred"])
        rng_state = state.get("minibatch_rng_state")
        if rng_state is not None:
            if self._minibatch_rng is None:
                raise ValueError("minibatch_rng_state: the state has a sequence-shuffling "
                                 "generator but this model has none (sequence_length=None)")
            self._minibatch_rng.bit_generator.state = copy.deepcopy(rng_state)

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + [  # type: ignore[misc]
            "reference_policy", "_reference_lstm_states", "_lr_scheduler", "_minibatch_rng"]

    def save(self, path: Any, exclude: Any = None, include: Any = None) -> None:
        """SB3's ``save``, with :meth:`get_training_state` stored alongside (pickled), so that
        ``load`` alone resumes every counter, the reference and the LR schedule."""
        self._training_state_on_save = self.get_training_state()
        try:
            super().save(path, exclude=exclude, include=include)  # type: ignore[misc]
        finally:
            del self._training_state_on_save

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
        """SB3's ``load``, then :meth:`set_training_state` with the state saved by :meth:`save`."""
        model = super().load(path, *args, **kwargs)  # type: ignore[misc]
        state = model.__dict__.pop("_training_state_on_save", None)
        if state is not None:
            model.set_training_state(state)
        return model


class KLPPO(KLRegularisedMixin, PPO):
    """SB3 ``PPO`` with the KL-regularised loop of :class:`KLRegularisedMixin`.

    Takes every argument of :class:`stable_baselines3.PPO` and the keyword-only arguments listed
    on :class:`KLRegularisedMixin`. The reference must be a feed-forward ``ActorCriticPolicy``;
    its logits are computed per minibatch.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        **PPO.policy_aliases, "TemperatureMlpPolicy": TemperatureMlpPolicy}

    def _check_reference_policy(self, policy: BasePolicy) -> None:
        if not isinstance(policy, ActorCriticPolicy) or isinstance(
                policy, RecurrentActorCriticPolicy):
            raise ValueError(f"policy={type(policy).__name__}: KLPPO needs a feed-forward "
                             f"ActorCriticPolicy as reference")

    def _evaluate_minibatch(self, rollout_data, actions):
        values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
        return values, log_prob, entropy, None

    def _minibatch_reference_logits(self, rollout_data) -> th.Tensor:
        with th.no_grad():
            logits, _ = action_log_probs(self.reference_policy, rollout_data.observations)
        return logits


class KLRecurrentPPO(KLRegularisedMixin, RecurrentPPO):
    """sb3-contrib ``RecurrentPPO`` with the KL-regularised loop of :class:`KLRegularisedMixin`.

    Takes every argument of :class:`sb3_contrib.RecurrentPPO` and the keyword-only arguments
    listed on :class:`KLRegularisedMixin`, plus:

    :param sequence_length: ``None`` (default): sb3-contrib's buffer and minibatches, so with
        the extras off this trains exactly like ``RecurrentPPO``. An integer ``L >= 1``:
        :class:`~sb3_warmstart.algorithms.recurrent_buffers.SequenceRolloutBuffer`, sequences cut at
        episode starts and every ``L`` steps (truncated backpropagation through time), padded
        once per rollout, one recurrent call per minibatch (module docs); Box observations
        only. Its shuffling generator is seeded with ``seed``.

    The reference must be a ``RecurrentActorCriticPolicy`` (any LSTM or GRU size); its hidden
    states are handled as described in the module docstring. Box observations only when a
    reference is used.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        **RecurrentPPO.policy_aliases, "TemperatureMlpLstmPolicy": TemperatureMlpLstmPolicy,
        "TemperatureMlpGruPolicy": TemperatureMlpGruPolicy}

    def __init__(self, policy: str | type[BasePolicy], env: Any, *,
                 sequence_length: int | None = None, **kwargs: Any) -> None:
        _check("sequence_length", sequence_length,
               sequence_length is None or (_is_int(sequence_length) and sequence_length >= 1),
               "must be None or an integer >= 1 (steps)")
        self.sequence_length = sequence_length
        super().__init__(policy, env, **kwargs)

    def _setup_rollout_buffer(self) -> None:
        old = self.rollout_buffer
        if not isinstance(self.observation_space, spaces.Box):
            if self.sequence_length is not None:
                raise ValueError(f"observation_space={self.observation_space}: sequence_length "
                                 f"needs Box observations")
            return  # Dict observations keep the stock buffer (no reference KL)
        args = (self.n_steps, self.observation_space, self.action_space, old.hidden_state_shape,
                self.device)
        kwargs = dict(gamma=self.gamma, gae_lambda=self.gae_lambda, n_envs=self.n_envs)
        if self.sequence_length is None:
            self._minibatch_rng = None
            self.rollout_buffer = RefLogitsRecurrentRolloutBuffer(*args, **kwargs)
            return
        self._minibatch_rng = np.random.default_rng(self.seed)
        self.rollout_buffer = SequenceRolloutBuffer(
            *args, **kwargs, sequence_length=self.sequence_length, rng=self._minibatch_rng)

    def _check_reference_policy(self, policy: BasePolicy) -> None:
        if not isinstance(policy, RecurrentActorCriticPolicy):
            raise ValueError(f"policy={type(policy).__name__}: KLRecurrentPPO needs a "
                             f"RecurrentActorCriticPolicy as reference")
        if not isinstance(self.rollout_buffer, RefLogitsRecurrentRolloutBuffer):
            raise ValueError(f"observation_space={self.observation_space}: the recurrent "
                             f"reference KL supports Box observations only")

    def _initial_reference_state(self, reference: BasePolicy) -> tuple[th.Tensor, th.Tensor]:
        lstm = reference.lstm_actor
        shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)
        return (th.zeros(shape, device=self.device), th.zeros(shape, device=self.device))

    def _prepare_reference(self) -> None:
        """Run the reference over the rollout, one sequence per env in time order, from its
        carried state; store its log-probabilities in the buffer and carry its final state."""
        buffer = self.rollout_buffer
        if not isinstance(buffer, RefLogitsRecurrentRolloutBuffer):
            return
        if self.reference_policy is None:
            buffer.ref_logits = None
            return
        if buffer.generator_ready:
            raise RuntimeError("rollout buffer already sampled: reference logits must be "
                               "computed before the first get()")
        n_steps, n_envs = buffer.buffer_size, buffer.n_envs
        # (n_steps, n_envs, ...) -> (n_envs * n_steps, ...): env-major sequences
        obs = th.as_tensor(buffer.swap_and_flatten(buffer.observations), device=self.device)
        starts = th.as_tensor(buffer.swap_and_flatten(buffer.episode_starts),
                              dtype=th.float32, device=self.device).flatten()
        with th.no_grad():
            logits, states = action_log_probs(self.reference_policy, obs,
                                              self._reference_lstm_states, starts)
        logits = logits.reshape(n_envs, n_steps, -1).swapaxes(0, 1)
        buffer.set_reference_logits(logits.cpu().numpy())
        self._reference_lstm_states = (states[0].detach(), states[1].detach())

    def _evaluate_minibatch(self, rollout_data, actions):
        # Convert mask from float to bool
        mask = rollout_data.mask > 1e-8
        values, log_prob, entropy = self.policy.evaluate_actions(
            rollout_data.observations, actions, rollout_data.lstm_states,
            rollout_data.episode_starts)
        return values, log_prob, entropy, mask

    def _minibatch_reference_logits(self, rollout_data) -> th.Tensor:
        return rollout_data.ref_logits
