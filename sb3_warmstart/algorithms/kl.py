"""KL terms and the regularised PPO loss, written once for PPO and RecurrentPPO.

Every reduction takes an optional boolean ``mask`` (``None`` = all entries valid): recurrent
minibatches are padded sequences and only the valid entries count. With ``mask=None`` the
reductions are exactly those of SB3's ``PPO.train`` (2.9.2); with a mask, those of
sb3-contrib's ``RecurrentPPO.train`` (2.9.2), so :func:`ppo_loss_terms` with every extra
coefficient at 0 reproduces the stock losses bit for bit.

Terms (all means over valid entries; ``logp`` = log-probability of the taken action):

====================  ==========================================================================
``kl_ref``            ``KL(pi || pi_ref) = sum_a pi(a) (log pi(a) - log pi_ref(a))`` (nats)
``kl_instant``        ``kl_coef * mean(logp_old - logp_new).clamp(min=0)`` (the design docs'
                      instant penalty: mean first, then clamp)
``approx_kl``         ``mean((exp(r) - 1) - r)``, ``r = logp_new - logp_old`` (SB3's estimator)
``entropy_floor``     ``entropy_floor_coef * relu(entropy_min - mean entropy)``
====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType

import torch as th
import torch.nn.functional as F


def masked_mean(values: th.Tensor, mask: th.Tensor | None = None) -> th.Tensor:
    """Mean over the entries where ``mask`` is True (all entries when ``mask`` is None)."""
    if mask is None:
        return th.mean(values)
    return th.mean(values[mask])


def categorical_kl(
    logits: th.Tensor, ref_logits: th.Tensor, mask: th.Tensor | None = None
) -> th.Tensor:
    """Mean over the batch of ``KL(pi || pi_ref)`` between two categorical distributions.

    :param logits: logits of ``pi`` (unnormalised is fine), shape ``(batch, n_actions)``;
        gradients flow through them.
    :param ref_logits: logits of ``pi_ref``, same shape (treated as constants by the caller).
    :param mask: boolean ``(batch,)``, True for the entries to average.
    :return: scalar tensor, in nats.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits shape "
                         f"{tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(ref_logits, dim=-1)
    per_entry = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return masked_mean(per_entry, mask)


def instant_kl_penalty(
    old_log_prob: th.Tensor, log_prob: th.Tensor, kl_coef: float, mask: th.Tensor | None = None
) -> th.Tensor:
    """``kl_coef * mean(logp_old - logp_new).clamp(min=0)``: mean over valid entries, then clamp.

    :param old_log_prob: log-probabilities of the taken actions under the rollout policy.
    :param log_prob: the same under the current policy (gradients flow through them).
    :param kl_coef: penalty coefficient (>= 0).
    """
    return kl_coef * masked_mean(old_log_prob - log_prob, mask).clamp(min=0.0)


def approx_kl(
    old_log_prob: th.Tensor, log_prob: th.Tensor, mask: th.Tensor | None = None
) -> th.Tensor:
    """SB3's estimator of ``KL(pi_old || pi_new)``: ``mean((exp(r) - 1) - r)``, ``r = logp_new -
    logp_old`` (Schulman's k3). Computed without gradient."""
    with th.no_grad():
        log_ratio = log_prob - old_log_prob
        return masked_mean((th.exp(log_ratio) - 1) - log_ratio, mask)


#: ``train/`` key of the fields SB3 already logs under another name.
_LOG_KEYS = MappingProxyType({"policy_loss": "policy_gradient_loss", "total": "loss"})


@dataclass(frozen=True)
class PPOLossTerms:
    """Every term of one minibatch's loss (scalar tensors; ``total`` carries the gradient).

    :param policy_loss: clipped surrogate loss (SB3's ``policy_gradient_loss``).
    :param value_loss: squared error to the returns (before ``vf_coef``).
    :param entropy_loss: minus the mean entropy (before the entropy coefficient).
    :param entropy: mean entropy of the action distribution (nats).
    :param entropy_coef: the entropy coefficient used (warm-up or base).
    :param kl_ref: ``KL(pi || pi_ref)`` (nats; 0 without a reference).
    :param kl_ref_coef: its coefficient (the term is added only when > 0).
    :param kl_instant: the instant KL penalty, coefficient included.
    :param entropy_floor_penalty: the entropy-floor hinge, coefficient included.
    :param approx_kl: SB3's ``approx_kl`` between the rollout and current policies (no grad).
    :param clip_fraction: share of valid entries whose ratio was clipped (no grad).
    :param total: the loss that is back-propagated.
    """

    policy_loss: th.Tensor
    value_loss: th.Tensor
    entropy_loss: th.Tensor
    entropy: th.Tensor
    entropy_coef: float
    kl_ref: th.Tensor
    kl_ref_coef: float
    kl_instant: th.Tensor
    entropy_floor_penalty: th.Tensor
    approx_kl: th.Tensor
    clip_fraction: th.Tensor
    total: th.Tensor

    def to_floats(self) -> dict[str, float]:
        """``{train/ key: value}`` for logging, one entry per field."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_LOG_KEYS.get(f.name, f.name)] = float(value.item() if isinstance(
                value, th.Tensor) else value)
        return out


def ppo_loss_terms(
    *,
    log_prob: th.Tensor,
    old_log_prob: th.Tensor,
    advantages: th.Tensor,
    values_pred: th.Tensor,
    returns: th.Tensor,
    entropy: th.Tensor | None,
    clip_range: float,
    ent_coef: float,
    vf_coef: float,
    normalize_advantage: bool = True,
    mask: th.Tensor | None = None,
    logits: th.Tensor | None = None,
    ref_logits: th.Tensor | None = None,
    kl_ref_coef: float = 0.0,
    kl_coef: float = 0.0,
    entropy_min: float | None = None,
    entropy_floor_coef: float = 0.0,
) -> PPOLossTerms:
    """The regularised PPO loss of one minibatch.

    ``total = policy_loss + ent_coef * entropy_loss + vf_coef * value_loss`` (SB3's order), then
    ``+ kl_ref_coef * kl_ref`` when ``kl_ref_coef > 0``, ``+ kl_instant`` when ``kl_coef > 0``
    and ``+ entropy_floor_penalty`` when ``entropy_min`` is set and ``entropy_floor_coef > 0``.
    Disabled terms are not added at all (so the stock loss is reproduced exactly).

    :param log_prob: log-probabilities of the taken actions under the current policy.
    :param old_log_prob: the same under the rollout policy.
    :param advantages: GAE advantages (normalised here when ``normalize_advantage``).
    :param values_pred: value predictions (already clipped by the caller if ``clip_range_vf``).
    :param returns: TD(lambda) returns.
    :param entropy: per-entry entropy, or None (then estimated as ``-log_prob``).
    :param clip_range: PPO's ratio clip ``epsilon``.
    :param ent_coef: entropy coefficient for this step.
    :param vf_coef: value-loss coefficient.
    :param normalize_advantage: standardise advantages over the valid entries.
    :param mask: boolean validity mask for padded recurrent batches (None = all valid).
    :param logits: current policy logits ``(batch, n_actions)``, needed for ``kl_ref``.
    :param ref_logits: reference policy logits, same shape (None = no reference).
    :param kl_ref_coef: coefficient of ``KL(pi || pi_ref)`` (>= 0).
    :param kl_coef: coefficient of the instant KL penalty (>= 0).
    :param entropy_min: entropy floor in nats, or None.
    :param entropy_floor_coef: coefficient of the hinge below the floor (>= 0).
    """
    if normalize_advantage and (advantages.numel() if mask is None else int(mask.sum())) > 1:
        advantages = (advantages - masked_mean(advantages, mask)) / (
            (advantages.std() if mask is None else advantages[mask].std()) + 1e-8)

    ratio = th.exp(log_prob - old_log_prob)
    policy_loss_1 = advantages * ratio
    policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
    policy_loss = -masked_mean(th.min(policy_loss_1, policy_loss_2), mask)
    with th.no_grad():
        clip_fraction = masked_mean((th.abs(ratio - 1) > clip_range).float(), mask)

    if mask is None:
        value_loss = F.mse_loss(returns, values_pred)
    else:
        value_loss = masked_mean((returns - values_pred) ** 2, mask)

    if entropy is None:
        entropy_loss = -masked_mean(-log_prob, mask)
    else:
        entropy_loss = -masked_mean(entropy, mask)

    total = policy_loss + ent_coef * entropy_loss + vf_coef * value_loss

    zero = th.zeros((), device=total.device)
    kl_ref = zero
    if ref_logits is not None:
        if logits is None:
            raise ValueError("ref_logits given without logits of the current policy")
        kl_ref = categorical_kl(logits, ref_logits, mask)
        if kl_ref_coef > 0:
            total = total + kl_ref_coef * kl_ref
    elif kl_ref_coef > 0:
        raise ValueError(f"kl_ref_coef={kl_ref_coef!r} > 0 but no reference logits were given")

    kl_instant = zero
    if kl_coef > 0:
        kl_instant = instant_kl_penalty(old_log_prob, log_prob, kl_coef, mask)
        total = total + kl_instant

    floor_penalty = zero
    if entropy_min is not None and entropy_floor_coef > 0:
        floor_penalty = entropy_floor_coef * F.relu(entropy_min + entropy_loss)
        total = total + floor_penalty

    return PPOLossTerms(
        policy_loss=policy_loss,
        value_loss=value_loss,
        entropy_loss=entropy_loss,
        entropy=-entropy_loss.detach(),
        entropy_coef=ent_coef,
        kl_ref=kl_ref,
        kl_ref_coef=kl_ref_coef,
        kl_instant=kl_instant,
        entropy_floor_penalty=floor_penalty,
        approx_kl=approx_kl(old_log_prob, log_prob, mask),
        clip_fraction=clip_fraction,
        total=total,
    )
