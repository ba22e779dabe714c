"""Actor-critic policies whose action distribution can be tempered or made uniform.

:class:`TemperatureMlpPolicy` (SB3's ``MlpPolicy``) and :class:`TemperatureMlpLstmPolicy`
(sb3-contrib's ``MlpLstmPolicy``) add two plain attributes and no parameter, so their
``state_dict`` keys are those of the parent and checkpoints load either way;
:class:`TemperatureMlpGruPolicy` is the recurrent one with GRU cells (see *GRU cells* below).
The attributes:

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
input of :func:`sb3_warmstart.algorithms.kl.categorical_kl`.

GRU cells
---------
sb3-contrib's recurrent machinery (``RecurrentPPO``'s rollouts and buffers, ``predict``, our
checkpoints, behaviour cloning and the reference KL) passes every recurrent state as a pair
``(h, c)`` of ``(n_layers, batch, hidden)`` tensors and reads the sizes off
``policy.lstm_actor``. :class:`GruCellsMixin` keeps that interface and swaps the modules: after
the parent is built, ``lstm_actor`` (and ``lstm_critic`` when there is one) are replaced by
``nn.GRU`` modules of the same input size, hidden size and layer count (the attribute names stay
sb3-contrib's, so every consumer finds them), and the optimiser is rebuilt over the new
parameters. A GRU's state travels as ``(h, c)`` with ``c`` always zero: :func:`process_sequence`
runs a GRU on ``h`` and passes ``c`` through untouched. A GRU layer has 3 gate blocks where an
LSTM has 4, so it has 3/4 of the recurrent parameters and work.
"""

from __future__ import annotations

from typing import Any, Literal

import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from torch import nn

#: The recurrent cells a recurrent policy can use (``PPOConfig.recurrent_cell``).
RecurrentCell = Literal["lstm", "gru"]


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


def process_sequence(
    features: th.Tensor,
    states: tuple[th.Tensor, th.Tensor],
    episode_starts: th.Tensor,
    rnn: nn.Module,
) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
    """``RecurrentActorCriticPolicy._process_sequence`` for an ``nn.LSTM`` or an ``nn.GRU``.

    An LSTM goes through sb3-contrib's own method (same numbers, bit for bit). A GRU follows the
    same logic on ``h`` alone and returns ``c`` as given (zero, see the module docs): one call
    over the whole sequences when no step is an episode start, else a step-by-step loop that
    zeroes ``h`` where an episode starts.

    :param features: ``(n_seq * length, input_size)``, sequence-major (``n_seq`` sequences laid
        end to end).
    :param states: ``(h, c)`` before each sequence's first step, each ``(n_layers, n_seq,
        hidden)``.
    :param episode_starts: ``(n_seq * length,)``, 1.0 where an episode starts.
    :param rnn: the ``nn.LSTM`` or ``nn.GRU``.
    :return: ``(outputs of shape (n_seq * length, hidden), (h, c) after the last step)``.
    """
    if not isinstance(rnn, nn.GRU):
        return RecurrentActorCriticPolicy._process_sequence(features, states, episode_starts, rnn)
    hidden, cell = states
    n_seq = hidden.shape[1]
    # (n_seq * length, input) -> (length, n_seq, input), as sb3-contrib lays out an LSTM's input
    sequence = features.reshape((n_seq, -1, rnn.input_size)).swapaxes(0, 1)
    starts = episode_starts.reshape((n_seq, -1)).swapaxes(0, 1)
    if th.all(starts == 0.0):
        output, hidden = rnn(sequence, hidden)
        return th.flatten(output.transpose(0, 1), start_dim=0, end_dim=1), (hidden, cell)
    outputs = []
    for step, start in zip(sequence, starts, strict=True):
        output, hidden = rnn(step.unsqueeze(dim=0), (1.0 - start).view(1, n_seq, 1) * hidden)
        outputs.append(output)
    return th.flatten(th.cat(outputs).transpose(0, 1), start_dim=0, end_dim=1), (hidden, cell)


def gru_like(lstm: nn.Module, **kwargs: Any) -> nn.GRU:
    """An ``nn.GRU`` with the input size, hidden size and layer count of ``lstm`` (PyTorch's
    default initialisation, like sb3-contrib's LSTMs); ``kwargs`` go to ``nn.GRU``."""
    return nn.GRU(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers, **kwargs)


class GruCellsMixin:
    """Put first in the bases of a ``RecurrentActorCriticPolicy`` subclass: its LSTMs become
    GRUs of the same sizes (module docs, *GRU cells*). ``lstm_kwargs`` are passed to the GRUs.
    The subclass's ``_process_sequence`` must handle GRUs (:func:`process_sequence` does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.lstm_actor = gru_like(self.lstm_actor, **self.lstm_kwargs)  # type: ignore[has-type]
        if self.lstm_critic is not None:  # type: ignore[has-type]
            self.lstm_critic = gru_like(self.lstm_critic, **self.lstm_kwargs)  # type: ignore[has-type]
        # the parent's optimiser holds the LSTMs' parameters: rebuild it over the GRUs'
        lr = self.optimizer.param_groups[0]["lr"]  # type: ignore[has-type]
        self.optimizer = self.optimizer_class(  # type: ignore[attr-defined]
            self.parameters(), lr=lr, **self.optimizer_kwargs)  # type: ignore[attr-defined]


class TemperatureMlpGruPolicy(GruCellsMixin, TemperatureMlpLstmPolicy):
    """:class:`TemperatureMlpLstmPolicy` with GRU cells in place of its LSTMs (module docs).

    Takes the same arguments; ``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``,
    ``enable_critic_lstm`` and ``lstm_kwargs`` apply to the GRUs.
    """

    _process_sequence = staticmethod(process_sequence)  # type: ignore[assignment]


def recurrent_policy_class(cell: RecurrentCell) -> type[RecurrentActorCriticPolicy]:
    """The recurrent MLP policy PPO trains for a ``PPOConfig.recurrent_cell``."""
    classes = {"lstm": TemperatureMlpLstmPolicy, "gru": TemperatureMlpGruPolicy}
    if cell not in classes:
        raise ValueError(f"recurrent_cell={cell!r}: must be one of {sorted(classes)}")
    return classes[cell]


def clone_policy_class(cell: RecurrentCell) -> str | type[RecurrentActorCriticPolicy]:
    """The recurrent policy behaviour cloning trains for a ``PPOConfig.recurrent_cell``:
    sb3-contrib's own ``"MlpLstmPolicy"`` for an LSTM (the clone loads with stock
    ``RecurrentPPO``), :class:`TemperatureMlpGruPolicy` for a GRU. Same weights as
    :func:`recurrent_policy_class`'s."""
    recurrent_policy_class(cell)  # validates the name
    return "MlpLstmPolicy" if cell == "lstm" else TemperatureMlpGruPolicy


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

