"""One policy for any cluster: a shared network scores each replica; the logits are the scores.

The observation of ``LLMCluster-v0`` is a flat vector: ``slots`` rows of ``F`` per-replica
features (replica-major; slots past the cluster's replicas are all zero, see
``ObservationConfig.replica_slots``), then the request and global features. These policies read
it as a *set* of replicas:

1. **Scaling** (inside the network, so it travels with the weights and into an export): every
   feature is ``log1p``-transformed (all are >= 0: counts, tokens, seconds, fractions, rates),
   then standardised with statistics fitted on demonstrations (:meth:`fit_feature_scaling`;
   per-replica features pooled over replicas, so every replica is scaled alike), then clipped
   to ``[-CLIP, CLIP]``. Two inputs are made size-free first: a replica's dispatch share is
   multiplied by the number of replicas (1 = its fair share) and the arrival rate divided by it
   (requests/s per replica).
2. **Encoder**: ``h_i = enc([x_i, g])`` for each replica ``i`` with the same weights (``g`` =
   request and global features).
3. **Cluster summary**: ``s = [mean_i h_i, max_i h_i, g, log N]`` over the replicas present.
4. **Actor**: ``logit_i = score([h_i, s])`` (same weights for every replica); absent slots get
   ``MASKED_LOGIT``. **Critic**: ``V = value(s)``.

No parameter depends on the number of replicas, so permuting the replicas permutes the action
probabilities (tested), and the same weights route 2 or 64 replicas: :func:`policy_for_spaces`
rebuilds a policy for another observation/action space and loads the weights. A replica's
presence is read from its ``speed_k`` feature (> 0 for every real replica).

:class:`ReplicaSetPolicy` is an SB3 ``ActorCriticPolicy`` (PPO / :class:`~sb3_warmstart.algorithms.ppo.KLPPO`);
:class:`RecurrentReplicaSetPolicy` an sb3-contrib ``RecurrentActorCriticPolicy``
(RecurrentPPO / :class:`~sb3_warmstart.algorithms.ppo.KLRecurrentPPO`) whose LSTMs run over the cluster
summary ``s`` only: the recurrent state lives in the summary, per-replica encodings bypass it,
and ``score([h_i, z_t])`` uses the LSTM output ``z_t``; :class:`RecurrentReplicaSetGruPolicy`
is the same with GRU cells (:class:`~sb3_warmstart.policies.recurrent.GruCellsMixin`). All take the
temperature and ``uniform_actions`` switches of :mod:`sb3_warmstart.policies.recurrent` (uniform over
present replicas).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_warmstart.policies.recurrent import (
    GruCellsMixin,
    RecurrentCell,
    TemperatureMlpPolicy,
    _TemperatureMixin,
    process_sequence,
    recurrent_policy_class,
)

#: Logit of an absent replica slot (finite, so KL terms stay finite: exp underflows to 0).
MASKED_LOGIT = -1e9
#: Standardised inputs are clipped to this many standard deviations.
CLIP = 10.0
#: The per-replica feature that tells a present replica (> 0) from an empty slot (0).
PRESENCE_FEATURE = "speed_k"


class SchemaMismatch(ValueError):
    """A policy was asked to act on observations with another feature schema."""


def _mlp(sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ReplicaSetExtractor(BaseFeaturesExtractor):
    """Scales the flat observation and encodes each replica (steps 1-3 of the module docs).

    Output, per sample: ``[s (summary_dim) | h_1..h_slots (slots * embed_dim) | mask (slots)]``;
    ``features_dim`` is ``summary_dim`` (the fixed-size part, what a recurrent policy's LSTM
    reads).

    :param observation_space: flat ``Box`` of ``slots * F + len(tail_features)`` features.
    :param replica_features: the ``F`` per-replica feature names, in column order.
    :param tail_features: names of the request and global features after the replica block.
    :param embed_dim: size of ``h_i``.
    :param hidden_dim: hidden width of the encoder.
    """

    def __init__(self, observation_space: spaces.Box, replica_features: Sequence[str],
                 tail_features: Sequence[str], embed_dim: int = 64, hidden_dim: int = 64,
                 activation_fn: type[nn.Module] = nn.ReLU) -> None:
        replica_features, tail_features = list(replica_features), list(tail_features)
        width = int(np.prod(observation_space.shape))
        per, tail = len(replica_features), len(tail_features)
        slots, rest = divmod(width - tail, per) if per else (0, 1)
        if rest or slots < 1:
            raise SchemaMismatch(
                f"observation of {width} features is not slots x {per} per-replica features "
                f"+ {tail} request/global features")
        if PRESENCE_FEATURE not in replica_features:
            raise SchemaMismatch(f"per-replica features need {PRESENCE_FEATURE!r} (presence)")
        summary_dim = 2 * embed_dim + tail + 1
        super().__init__(observation_space, features_dim=summary_dim)
        self.replica_features = replica_features
        self.tail_features = tail_features
        self.slots = slots
        self.embed_dim = embed_dim
        self.summary_dim = summary_dim
        self._presence = replica_features.index(PRESENCE_FEATURE)
        self._share = replica_features.index("dispatch_share") if "dispatch_share" in \
            replica_features else None
        self._rate = tail_features.index("global/arrival_rate") if "global/arrival_rate" in \
            tail_features else None
        # one-hot of the columns made size-free (constants, not in the state dict)
        self.register_buffer("share_column", th.zeros(per), persistent=False)
        self.register_buffer("rate_column", th.zeros(tail), persistent=False)
        if self._share is not None:
            self.share_column[self._share] = 1.0
        if self._rate is not None:
            self.rate_column[self._rate] = 1.0
        # standardisation of the log1p-transformed inputs (fitted by fit_feature_scaling)
        self.register_buffer("replica_mean", th.zeros(per))
        self.register_buffer("replica_std", th.ones(per))
        self.register_buffer("tail_mean", th.zeros(tail))
        self.register_buffer("tail_std", th.ones(tail))
        self.encoder = nn.Sequential(_mlp([per + tail, hidden_dim, embed_dim], activation_fn),
                                     activation_fn())

    # ------------------------------------------------------------------ scaling
    def split(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``(replicas (B, slots, F), tail (B, T))``: the flat observation as a set of replica
        rows (absent slots included, all zero) and the request/global features."""
        per = len(self.replica_features)
        block = obs[:, : self.slots * per].reshape(obs.shape[0], self.slots, per)
        return block, obs[:, self.slots * per:]

    def transformed_set(self, block: th.Tensor, tail: th.Tensor
                        ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """:meth:`transformed` on a set of ``N`` replica rows ``(B, N, F)`` and the tail
        ``(B, T)``; ``N`` comes from the tensor, not from the slots the extractor was built for
        (an exported graph takes it as a dynamic axis)."""
        mask = (block[:, :, self._presence] > 0).to(block.dtype)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        # one column scaled by the replica count: 1 + onehot * (count - 1) is exactly count
        # there and exactly 1 elsewhere (no scatter: an exported graph stays small)
        if self._share is not None:
            block = block * (1.0 + self.share_column * (count.unsqueeze(-1) - 1.0))
        if self._rate is not None:
            tail = tail / (1.0 + self.rate_column * (count - 1.0))
        return th.log1p(block.clamp(min=0.0)), th.log1p(tail.clamp(min=0.0)), mask

    def transformed(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """``(replicas (B, slots, F), tail (B, T), mask (B, slots))``: log1p-transformed,
        size-free inputs before standardisation; ``mask`` is 1.0 for present replicas."""
        return self.transformed_set(*self.split(obs))

    def standardised_set(self, block: th.Tensor, tail: th.Tensor
                         ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Inputs of the encoder for replica rows ``(B, N, F)`` and the tail ``(B, T)``:
        transformed, standardised and clipped to ``[-CLIP, CLIP]``."""
        block, tail, mask = self.transformed_set(block, tail)
        block = ((block - self.replica_mean) / self.replica_std).clamp(-CLIP, CLIP)
        tail = ((tail - self.tail_mean) / self.tail_std).clamp(-CLIP, CLIP)
        return block * mask.unsqueeze(-1), tail, mask

    def standardised(self, obs: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Inputs of the encoder: transformed, standardised and clipped to ``[-CLIP, CLIP]``."""
        return self.standardised_set(*self.split(obs))

    @th.no_grad()
    def fit_scaling(self, observations: np.ndarray) -> dict[str, float]:
        """Fit the standardisation on raw observations ``(n, width)``; per-replica features are
        pooled over present replicas. Returns the share of inputs at the clip bound."""
        obs = th.as_tensor(np.asarray(observations, dtype=np.float32))
        block, tail, mask = self.transformed(obs)
        present = block[mask > 0]
        if present.shape[0] < 2:
            raise ValueError("fit_scaling: needs observations of at least two present replicas")
        self.replica_mean.copy_(present.mean(0))
        self.replica_std.copy_(present.std(0).clamp(min=1e-3))
        self.tail_mean.copy_(tail.mean(0))
        self.tail_std.copy_(tail.std(0).clamp(min=1e-3) if tail.shape[0] > 1
                            else th.ones_like(self.tail_std))
        return clip_share(self, observations)

    # ------------------------------------------------------------------ forward
    def encode_set(self, block: th.Tensor, tail: th.Tensor
                   ) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Steps 1-3 of the module docs on replica rows ``(B, N, F)`` and the tail ``(B, T)``
        (any ``N``): ``(summary (B, summary_dim), h (B, N, embed_dim), mask (B, N))``."""
        block, tail, mask = self.standardised_set(block, tail)
        slots = block.shape[1]
        inputs = th.cat([block, tail.unsqueeze(1).expand(-1, slots, -1)], -1)
        h = self.encoder(inputs) * mask.unsqueeze(-1)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        mean = h.sum(dim=1) / count
        maximum = h.masked_fill(mask.unsqueeze(-1) == 0, -1e4).max(dim=1).values
        summary = th.cat([mean, maximum, tail, th.log(count)], dim=1)
        return summary, h, mask

    def forward(self, obs: th.Tensor) -> th.Tensor:
        summary, h, mask = self.encode_set(*self.split(obs))
        return th.cat([summary, h.reshape(obs.shape[0], -1), mask], dim=1)


@th.no_grad()
def clip_share(extractor: ReplicaSetExtractor, observations: np.ndarray) -> dict[str, float]:
    """Share of decisions (rows) with any input at the clip bound, and of all inputs."""
    obs = th.as_tensor(np.asarray(observations, dtype=np.float32))
    block, tail, mask = extractor.transformed(obs)
    z_block = (block - extractor.replica_mean) / extractor.replica_std
    z_tail = (tail - extractor.tail_mean) / extractor.tail_std
    at_block = (z_block.abs() >= CLIP) & (mask.unsqueeze(-1) > 0)
    at_tail = z_tail.abs() >= CLIP
    rows = at_block.flatten(1).any(1) | at_tail.any(1)
    inputs = int(at_block.sum() + at_tail.sum())
    total = int(mask.sum()) * block.shape[-1] + tail.numel()
    return {"decisions_at_clip": float(rows.float().mean()),
            "inputs_at_clip": inputs / max(total, 1)}


class ReplicaSetHeads(nn.Module):
    """Actor and critic heads over a :class:`ReplicaSetExtractor`'s output (or a recurrent
    policy's, whose summary part is the LSTM output).

    ``forward_actor`` returns the masked logits ``(B, slots)``; ``forward_critic`` the value
    ``(B, 1)``; SB3's ``action_net`` and ``value_net`` are identities.
    """

    def __init__(self, summary_dim: int, embed_dim: int, hidden_dim: int,
                 activation_fn: type[nn.Module]) -> None:
        super().__init__()
        self.summary_dim = summary_dim
        self.embed_dim = embed_dim
        self.score = _mlp([embed_dim + summary_dim, hidden_dim, hidden_dim, 1], activation_fn)
        self.value = _mlp([summary_dim, hidden_dim, hidden_dim, 1], activation_fn)
        # SB3 reads these to size action_net/value_net, which are replaced by identities
        self.latent_dim_pi = 1
        self.latent_dim_vf = 1

    def _split(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        summary = features[:, : self.summary_dim]
        rest = features[:, self.summary_dim:]
        slots = rest.shape[1] // (self.embed_dim + 1)
        h = rest[:, : slots * self.embed_dim].reshape(-1, slots, self.embed_dim)
        return summary, h, rest[:, slots * self.embed_dim:]

    def score_replicas(self, summary: th.Tensor, h: th.Tensor, mask: th.Tensor) -> th.Tensor:
        """Masked logits ``(B, N)`` of replica encodings ``h (B, N, embed_dim)`` against the
        summary ``(B, summary_dim)`` (any ``N``)."""
        pairs = th.cat([h, summary.unsqueeze(1).expand(-1, h.shape[1], -1)], -1)
        logits = self.score(pairs).squeeze(-1)
        return logits.masked_fill(mask == 0, MASKED_LOGIT)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self.score_replicas(*self._split(features))

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self.value(features[:, : self.summary_dim])

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


def _set_policy_kwargs(kwargs: dict[str, Any], replica_features: Sequence[str],
                       tail_features: Sequence[str], embed_dim: int, hidden_dim: int) -> None:
    kwargs.setdefault("activation_fn", nn.ReLU)
    kwargs["features_extractor_class"] = ReplicaSetExtractor
    kwargs["features_extractor_kwargs"] = dict(
        replica_features=list(replica_features), tail_features=list(tail_features),
        embed_dim=embed_dim, hidden_dim=hidden_dim, activation_fn=kwargs["activation_fn"])
    kwargs["share_features_extractor"] = True
    kwargs["net_arch"] = []


class _ReplicaSetMixin(_TemperatureMixin):
    """What both set policies add to their SB3 base: the heads, identities for SB3's
    ``action_net``/``value_net``, mask-aware uniform actions, schema checks."""

    replica_features: list[str]
    tail_features: list[str]

    def _init_set(self, replica_features, tail_features, embed_dim, hidden_dim) -> None:
        self.replica_features = list(replica_features)
        self.tail_features = list(tail_features)
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim

    def _summary_dim(self) -> int:
        return self.features_extractor.summary_dim  # type: ignore[attr-defined]

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = ReplicaSetHeads(self._summary_dim(), self.embed_dim,
                                             self.hidden_dim, self.activation_fn)  # type: ignore[attr-defined]

    def _finish_build(self, lr_schedule) -> None:
        """Replace SB3's linear action/value nets by identities, re-initialise the output
        layers (small logits, unit-gain value) and rebuild the optimiser over the parameters."""
        self.action_net = nn.Identity()
        self.value_net = nn.Identity()
        heads: ReplicaSetHeads = self.mlp_extractor  # type: ignore[attr-defined]
        nn.init.orthogonal_(heads.score[-1].weight, gain=0.01)
        nn.init.zeros_(heads.score[-1].bias)
        nn.init.orthogonal_(heads.value[-1].weight, gain=1.0)
        nn.init.zeros_(heads.value[-1].bias)
        self.optimizer = self.optimizer_class(  # type: ignore[attr-defined]
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[attr-defined]

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        if self.uniform_actions:  # uniform over the replicas present
            logits = th.where(latent_pi > MASKED_LOGIT / 2, th.zeros_like(latent_pi), latent_pi)
            return self.action_dist.proba_distribution(action_logits=logits)  # type: ignore[attr-defined]
        if self.temperature == 1.0:
            return self.action_dist.proba_distribution(action_logits=latent_pi)  # type: ignore[attr-defined]
        return self.action_dist.proba_distribution(  # type: ignore[attr-defined]
            action_logits=latent_pi / self.temperature)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(replica_features=self.replica_features, tail_features=self.tail_features,
                    embed_dim=self.embed_dim, hidden_dim=self.hidden_dim)
        for key in ("features_extractor_class", "features_extractor_kwargs", "net_arch",
                    "share_features_extractor"):
            data.pop(key, None)
        return data

    def fit_feature_scaling(self, observations: np.ndarray) -> dict[str, float]:
        """Fit the input standardisation on raw observations (see the module docs)."""
        return self.features_extractor.fit_scaling(observations)  # type: ignore[attr-defined]

    def check_schema(self, replica_features: Sequence[str], tail_features: Sequence[str]) -> None:
        """:class:`SchemaMismatch` naming the first feature that differs from this policy's."""
        for kind, mine, theirs in (("per-replica", self.replica_features, list(replica_features)),
                                   ("request/global", self.tail_features, list(tail_features))):
            if mine != theirs:
                index = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                             min(len(mine), len(theirs)))
                ours = mine[index] if index < len(mine) else "none"
                other = theirs[index] if index < len(theirs) else "none"
                raise SchemaMismatch(
                    f"{kind} feature {index}: the policy was trained with {ours!r}, the "
                    f"cluster's observation has {other!r} (policy: {mine}; cluster: {theirs})")


class ReplicaSetPolicy(_ReplicaSetMixin, ActorCriticPolicy):
    """Feed-forward permutation-equivariant router policy (module docs).

    Takes the arguments of SB3's ``ActorCriticPolicy`` (``net_arch`` and feature-extractor
    arguments are set here), plus:

    :param replica_features: per-replica feature names of the observation, in column order
        (``env.unwrapped.layout.replica_features``).
    :param tail_features: request and global feature names after the replica block.
    :param embed_dim: size of each replica's encoding ``h_i``.
    :param hidden_dim: hidden width of the encoder and heads.
    :param temperature: sampling temperature (see :mod:`sb3_warmstart.policies.recurrent`).
    """

    def __init__(self, observation_space, action_space, lr_schedule, *,
                 replica_features: Sequence[str], tail_features: Sequence[str],
                 embed_dim: int = 64, hidden_dim: int = 64, **kwargs: Any) -> None:
        self._init_set(replica_features, tail_features, embed_dim, hidden_dim)
        _set_policy_kwargs(kwargs, replica_features, tail_features, embed_dim, hidden_dim)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self._finish_build(lr_schedule)


class RecurrentReplicaSetPolicy(_ReplicaSetMixin, RecurrentActorCriticPolicy):
    """Recurrent permutation-equivariant router policy: LSTMs over the cluster summary.

    Takes the arguments of sb3-contrib's ``RecurrentActorCriticPolicy`` plus those of
    :class:`ReplicaSetPolicy`. ``lstm_hidden_size`` is the size of the recurrent summary
    ``z_t`` the actor scores replicas against.
    """

    def __init__(self, observation_space, action_space, lr_schedule, *,
                 replica_features: Sequence[str], tail_features: Sequence[str],
                 embed_dim: int = 64, hidden_dim: int = 64, **kwargs: Any) -> None:
        self._init_set(replica_features, tail_features, embed_dim, hidden_dim)
        _set_policy_kwargs(kwargs, replica_features, tail_features, embed_dim, hidden_dim)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _summary_dim(self) -> int:
        return self.lstm_output_dim

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """Also the recurrent settings (sb3-contrib's class leaves them out), so that
        :func:`policy_for_spaces` rebuilds the same recurrent cells."""
        data = super()._get_constructor_parameters()
        data.update(lstm_hidden_size=self.lstm_output_dim,
                    n_lstm_layers=self.lstm_actor.num_layers, shared_lstm=self.shared_lstm,
                    enable_critic_lstm=self.enable_critic_lstm,
                    lstm_kwargs=dict(self.lstm_kwargs))
        return data

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        self._finish_build(lr_schedule)

    def _process_sequence(self, features: th.Tensor, lstm_states, episode_starts, lstm):
        """The LSTM (or GRU) reads only the summary part of the features; the per-replica
        encodings and the mask pass through, after its output ``z_t``."""
        summary_dim = self.features_extractor.summary_dim
        z, states = process_sequence(features[:, :summary_dim], lstm_states, episode_starts,
                                     lstm)
        return th.cat([z, features[:, summary_dim:]], dim=1), states


class RecurrentReplicaSetGruPolicy(GruCellsMixin, RecurrentReplicaSetPolicy):
    """:class:`RecurrentReplicaSetPolicy` with GRU cells over the cluster summary (same
    arguments; ``lstm_hidden_size`` is the size of the GRU's output ``z_t``)."""


SET_POLICIES = (ReplicaSetPolicy, RecurrentReplicaSetPolicy)


def policy_class_for(replica_set: bool, recurrent: bool,
                     cell: RecurrentCell = "lstm") -> type[ActorCriticPolicy]:
    """The policy class PPO trains and behaviour cloning fills: a replica-set policy, or SB3's
    MLP / sb3-contrib's LSTM policy (with the temperature switches of
    :mod:`sb3_warmstart.policies.recurrent`); ``cell`` (``PPOConfig.recurrent_cell``) picks LSTM or GRU
    cells for a recurrent one."""
    if recurrent:
        recurrent_policy_class(cell)  # validates the name
    if replica_set:
        if not recurrent:
            return ReplicaSetPolicy
        return RecurrentReplicaSetGruPolicy if cell == "gru" else RecurrentReplicaSetPolicy
    return recurrent_policy_class(cell) if recurrent else TemperatureMlpPolicy


def policy_for_spaces(policy: ActorCriticPolicy, observation_space: spaces.Box,
                      action_space: spaces.Discrete) -> ActorCriticPolicy:
    """The same set policy (class, settings and weights) for another number of replica slots;
    the weights are shared by copying (the new policy is independent)."""
    if not isinstance(policy, SET_POLICIES):
        raise TypeError(f"{type(policy).__name__} is tied to its replica count; only the "
                        f"replica-set policies route another number of replicas")
    params = policy._get_constructor_parameters()
    params.update(observation_space=observation_space, action_space=action_space)
    new = type(policy)(**params)
    new.load_state_dict(policy.state_dict())
    new.temperature = policy.temperature
    return new.to(policy.device)


def slots_of(observation_space: spaces.Box, num_replica_features: int, num_tail: int) -> int:
    """Replica slots of a flat observation space."""
    width = int(np.prod(observation_space.shape))
    return (width - num_tail) // num_replica_features


__all__ = ["CLIP", "MASKED_LOGIT", "SET_POLICIES", "policy_class_for",
           "RecurrentReplicaSetGruPolicy", "RecurrentReplicaSetPolicy",
           "ReplicaSetExtractor", "ReplicaSetHeads", "ReplicaSetPolicy", "SchemaMismatch",
           "clip_share", "policy_for_spaces", "slots_of"]

