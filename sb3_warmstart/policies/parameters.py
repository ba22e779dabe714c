"""Which parameters of an actor-critic policy the actor never reads."""

from __future__ import annotations

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy


def critic_only_parameters(policy: ActorCriticPolicy) -> list[th.nn.Parameter]:
    """Parameters only the value prediction uses: ``value_net``, the critic MLP (SB3's
    ``mlp_extractor.value_net`` or the replica-set heads' ``mlp_extractor.value``), the critic
    LSTM or linear layer, and a separate critic features extractor. The actor never reads
    them, so fitting the value head cannot change the cloned action distribution."""
    prefixes = ["value_net.", "mlp_extractor.value_net.", "mlp_extractor.value.",
                "lstm_critic.", "critic."]
    if not policy.share_features_extractor:
        prefixes.append("vf_features_extractor.")
    return [p for name, p in policy.named_parameters()
            if any(name.startswith(prefix) for prefix in prefixes)]
