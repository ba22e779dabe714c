"""Actor-critic policies whose action distribution can be tempered or made uniform.

:class:`TemperatureMlpPolicy` (SB3's ``MlpPolicy``) and :class:`TemperatureMlpLstmPolicy`
(sb3-contrib's ``MlpLstmPolicy``) add two plain attributes and no parameter, so their
``state_dict`` keys are those of the parent and checkpoints load either way:

``temperature`` (float > 0, default 1.0)
    The categorical logits are divided by it wherever the action distribution is built
    (rollouts, ``predict`` and ``evaluate_actions``), so PPO's probability ratio compares two
    distributions at the same temperature. ``T > 1`` flattens the distribution (more entropy),
    ``T < 1`` sharpens it. At exactly 1.0 the division is skipped and the policy computes
    exactly what the parent computes.
``uniform_actions`` (bool, default False)
    When True the distribution is uniform over the actions whatever the logits: actions are
    drawn uniformly at random (a random router, used while normalisers stabilise) and their
    log-probabilities are ``-log(n_actions)``. ``deterministic=True`` then returns action 0.

Both act on discrete (``Discrete``) action spaces only; other distributions raise a
``ValueError`` as soon as a non-default setting is used.

:func:`action_log_probs` returns a batch's normalised action logits (log-probabilities), the
input of :func:`sb3_warmstart.kl.categorical_kl`.
"""

from __future__ import annotations

from typing import Any

import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0")
    return temperature


class _TemperatureMixin:
    """The override shared by both policies (``_get_action_dist_from_latent``)."""

    temperature: float = 1.0
    uniform_actions: bool = False

    def __init__(self, *args: Any, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.temperature = _check_temperature(temperature)
        self.uniform_actions = False

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor) -> Distribution:
        if self.temperature == 1.0 and not self.uniform_actions:
            return super()._get_action_dist_from_latent(latent_pi)  # type: ignore[misc]
        if not isinstance(self.action_dist, CategoricalDistribution):  # type: ignore[attr-defined]
            raise ValueError(
                f"temperature={self.temperature!r}, uniform_actions={self.uniform_actions!r}: "
                f"only supported for Discrete action spaces, got "
                f"{type(self.action_dist).__name__}")  # type: ignore[attr-defined]
        logits = self.action_net(latent_pi)  # type: ignore[attr-defined]
        if self.uniform_actions:
            logits = th.zeros_like(logits)
        else:
            logits = logits / _check_temperature(self.temperature)
        return self.action_dist.proba_distribution(action_logits=logits)  # type: ignore[attr-defined]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data["temperature"] = self.temperature
        return data


class TemperatureMlpPolicy(_TemperatureMixin, ActorCriticPolicy):
    """SB3's ``MlpPolicy`` with a sampling ``temperature`` and a ``uniform_actions`` switch.

    Takes every argument of :class:`stable_baselines3.common.policies.ActorCriticPolicy`, plus:

    :param temperature: initial value of the ``temperature`` attribute (> 0, dimensionless):
        the logits are divided by it. Change it at any time by assigning the attribute.
    """


class TemperatureMlpLstmPolicy(_TemperatureMixin, RecurrentActorCriticPolicy):
    """sb3-contrib's ``MlpLstmPolicy`` with a sampling ``temperature`` and ``uniform_actions``.

    Takes every argument of :class:`sb3_contrib.common.recurrent.policies.
    RecurrentActorCriticPolicy`, plus:

    :param temperature: initial value of the ``temperature`` attribute (> 0, dimensionless):
        the logits are divided by it. Change it at any time by assigning the attribute.
    """


def distribution_log_probs(distribution: Distribution) -> th.Tensor:
    """The normalised logits (log-probabilities, shape ``(batch, n_actions)``) of a categorical
    SB3 distribution, keeping the autograd graph.

    :raises ValueError: when the distribution is not categorical.
    """
    if not isinstance(distribution, CategoricalDistribution):
        raise ValueError(f"distribution={type(distribution).__name__}: action logits need a "
                         f"CategoricalDistribution (a Discrete action space)")
    return distribution.distribution.logits


def action_log_probs(
    policy: BasePolicy,
    obs: th.Tensor,
    lstm_states: tuple[th.Tensor, th.Tensor] | None = None,
    episode_starts: th.Tensor | None = None,
) -> tuple[th.Tensor, tuple[th.Tensor, ...] | None]:
    """Normalised action logits (log-probabilities) of ``policy`` for a batch of observations.

    The policy's own ``temperature``/``uniform_actions`` apply. No ``no_grad`` is imposed.

    :param policy: a feed-forward ``ActorCriticPolicy`` or a ``RecurrentActorCriticPolicy``.
    :param obs: observations, shape ``(batch, *obs_shape)``; for a recurrent policy the batch is
        ``n_seq`` sequences laid end to end (sequence-major, as in
        ``RecurrentActorCriticPolicy._process_sequence``).
    :param lstm_states: recurrent only: the actor LSTM's ``(h, c)`` before the first step of each
        sequence, each of shape ``(n_layers, n_seq, hidden)``.
    :param episode_starts: recurrent only: 1.0 where an episode starts (the state is reset
        there), shape ``(batch,)``.
    :return: ``(log_probs of shape (batch, n_actions), new LSTM states or None)``.
    """
    if isinstance(policy, RecurrentActorCriticPolicy):
        if lstm_states is None or episode_starts is None:
            raise ValueError("lstm_states and episode_starts are required for a recurrent policy")
        distribution, states = policy.get_distribution(obs, lstm_states, episode_starts)
        return distribution_log_probs(distribution), states
    if isinstance(policy, ActorCriticPolicy):
        return distribution_log_probs(policy.get_distribution(obs)), None
    raise ValueError(f"policy={type(policy).__name__}: expected an ActorCriticPolicy")

