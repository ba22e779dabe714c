"""Behaviour cloning into the exact (Recurrent)PPO policy, on VecNormalize-normalised inputs.

imitation's ``BC`` trains feed-forward policies on shuffled transitions; it cannot train the
LSTM of sb3-contrib's ``RecurrentActorCriticPolicy``. :class:`SequenceBC` can, and also runs the
plain per-sample path for SB3's feed-forward ``ActorCriticPolicy``:

* **Recurrent path** (truncated BPTT). Each training trajectory is cut into consecutive chunks
  of ``sequence_length`` steps. Trajectories are dealt to ``batch_size`` *lanes*; a gradient
  step takes the next chunk of every lane. The recurrent state is carried from one chunk to the
  next inside a lane (detached between chunks, so gradients stop at chunk borders) and zeroed
  where a new trajectory starts, exactly as RecurrentPPO zeroes it at ``episode_start``. Short
  final chunks are padded and masked out of every loss and metric. The forward pass uses the
  policy's own modules in the order ``RecurrentActorCriticPolicy.forward`` uses them (features
  extractor, ``_process_sequence`` with ``lstm_actor``, ``mlp_extractor.forward_actor``,
  ``action_net``; the critic through ``lstm_critic``, the detached shared LSTM, or the ``critic``
  layer as the policy is configured), so the cloned weights mean the same thing at rollout
  time. GRU cells (:class:`~sb3_warmstart.policies.recurrent.GruCellsMixin`) go the same way:
  their state travels as sb3-contrib's ``(h, c)`` pair with ``c`` always zero.
* **Feed-forward path**: shuffled samples, ``batch_size * sequence_length`` per gradient step
  (the same number of steps per update as the recurrent path).

Both paths see observations normalised exactly as SB3's ``VecNormalize`` will normalise them
during PPO (:class:`ObsNormalizer`, fitted by :func:`fit_obs_normalizer`), and can fit the value
head on discounted returns of the demonstration rewards (optionally normalised like
``VecNormalize(norm_reward=True)``: :class:`ReturnNormalizer`), so PPO starts with a critic that
matches the cloned actor.

Randomness: the train/validation split and the per-epoch shuffles come from the ``rng`` given;
the policy's initial weights come from torch's generator (seed it when building the policy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.running_mean_std import RunningMeanStd

from sb3_warmstart.common.normalize import ObsNormalizer, ReturnNormalizer, acting_observations
from sb3_warmstart.pipeline.config import BCConfig, PPOConfig
from sb3_warmstart.policies.parameters import critic_only_parameters

if TYPE_CHECKING:  # pragma: no cover
    from imitation.data.types import Trajectory
    from stable_baselines3.common.logger import Logger

def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_t + gamma * G_{t+1}`` with ``G`` = 0 after the last step (terminal)."""
    out = np.empty(len(rewards), dtype=np.float64)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = float(rewards[t]) + gamma * acc
        out[t] = acc
    return out


# ------------------------------------------------------------------------- presets, losses
@dataclass(frozen=True)
class BCPreset:
    """A policy architecture and BC hyperparameters that go together (``train/pretrain.py
    --mode``); the main job takes both from its config's ``ppo`` and ``bc`` sections instead.

    :param name: preset name.
    :param bc: the BC hyperparameters.
    :param architecture: :class:`~sb3_warmstart.pipeline.config.PPOConfig` fields that differ
        from its defaults (``net_arch``, ``lstm_hidden_size``, ``n_lstm_layers``).
    """

    name: str
    bc: BCConfig
    architecture: Mapping[str, Any] = field(default_factory=dict)

    def ppo(self, **fields: Any) -> PPOConfig:
        """The PPO config whose policy this preset clones into (``fields`` added)."""
        return PPOConfig(**{**self.architecture, **fields})


PRESETS: Mapping[str, BCPreset] = MappingProxyType({
    # 64-unit LSTM and layers over the flat observation (the single-scenario policy),
    # cosine learning rate, 60 epochs.
    "standard": BCPreset("standard", BCConfig(epochs=60),
                         {"policy": "mlp", "algorithm": "recurrent_ppo"}),
    # High capacity: wider layers and LSTM, more epochs, longer sequences, weight decay.
    "enhanced": BCPreset("enhanced", BCConfig(epochs=100, sequence_length=64, learning_rate=1e-3,
                                              weight_decay=1e-4, ent_coef=1e-3),
                         {"policy": "mlp", "algorithm": "recurrent_ppo",
                          "net_arch": (256, 256), "lstm_hidden_size": 256}),
})


@dataclass(frozen=True)
class BCLoss:
    """Loss terms of one gradient step (masked means over valid steps).

    ``total = neglogp - ent_coef * entropy + vf_coef * value_loss``.
    """

    neglogp: th.Tensor
    entropy: th.Tensor
    value_loss: th.Tensor
    total: th.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("neglogp", "entropy",
                                                              "value_loss", "total")}


@dataclass(frozen=True)
class BCLossCalculator:
    """Computes :class:`BCLoss` from the policy's action distribution and value predictions.

    :param ent_coef: weight of the entropy bonus (subtracted from the loss).
    :param vf_coef: weight of the value regression term.
    """

    ent_coef: float
    vf_coef: float

    def __call__(self, dist: Distribution, actions: th.Tensor, values: th.Tensor | None,
                 returns: th.Tensor | None, mask: th.Tensor,
                 targets: th.Tensor | None = None) -> BCLoss:
        """``targets`` (``(B, num_actions)`` distributions, optional) replaces the one-hot
        ``actions``: the imitation term is then the cross-entropy ``-sum_a q_a log pi_a``."""
        denom = mask.sum().clamp_min(1.0)
        if targets is None:
            logp = dist.log_prob(actions)
        else:
            log_pi = th.log_softmax(dist.distribution.logits, dim=-1)
            logp = (targets * log_pi).sum(dim=-1)
        neglogp = -(logp * mask).sum() / denom
        entropy = (dist.entropy() * mask).sum() / denom
        if values is not None and returns is not None:
            value_loss = (((values - returns) ** 2) * mask).sum() / denom
        else:
            value_loss = th.zeros((), device=mask.device)
        total = neglogp - self.ent_coef * entropy + self.vf_coef * value_loss
        return BCLoss(neglogp=neglogp, entropy=entropy, value_loss=value_loss, total=total)


@dataclass(frozen=True)
class BCEvalMetrics:
    """Agreement of the policy's deterministic action (argmax) with the expert on a split.

    :param accuracy: fraction of steps with argmax == expert action.
    :param tie_accuracy: fraction of steps whose argmax is among the replicas the expert rule
        considers equally good (NaN without ``tied_choices``).
    :param nll: mean negative log-likelihood of the expert action (nats).
    :param value_loss: mean squared error of the value head against the discounted returns
        (NaN without value pretraining).
    :param predicted_share: fraction of steps on which the argmax is each action.
    :param expert_share: fraction of steps on which the expert chose each action.
    :param num_steps: number of steps scored.
    """

    accuracy: float
    tie_accuracy: float
    nll: float
    value_loss: float
    predicted_share: tuple[float, ...]
    expert_share: tuple[float, ...]
    num_steps: int


@dataclass(frozen=True)
class BCEpochMetrics:
    """What one epoch did. Train numbers are means over the epoch's gradient steps, measured
    before each step's update."""

    epoch: int
    gradient_steps: int
    learning_rate: float
    train_neglogp: float
    train_entropy: float
    train_value_loss: float
    train_loss: float
    train_accuracy: float
    val: BCEvalMetrics | None
    wall_time_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, logger: Logger) -> None:
        """Write every field to an SB3 logger: loss terms under ``train/``, validation under
        ``val/``, one ``*_share_{i}`` scalar per action."""
        logger.record("train/epoch", self.epoch)
        logger.record("train/gradient_steps", self.gradient_steps)
        logger.record("train/learning_rate", self.learning_rate)
        logger.record("train/neglogp", self.train_neglogp)
        logger.record("train/entropy", self.train_entropy)
        logger.record("train/value_loss", self.train_value_loss)
        logger.record("train/loss", self.train_loss)
        logger.record("train/accuracy", self.train_accuracy)
        if self.val is not None:
            v = self.val
            for key in ("accuracy", "tie_accuracy", "nll", "value_loss"):
                logger.record(f"val/{key}", getattr(v, key))
            for i, (p, e) in enumerate(zip(v.predicted_share, v.expert_share)):
                logger.record(f"val/predicted_share_{i}", p)
                logger.record(f"val/expert_share_{i}", e)


# -------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Chunk:
    """Steps ``[start, stop)`` of trajectory ``trajectory`` (indices into one split)."""

    trajectory: int
    start: int
    stop: int


def plan_lanes(lengths: Sequence[int], order: Sequence[int], sequence_length: int,
               num_lanes: int) -> list[list[Chunk]]:
    """Deal trajectories (in ``order``) to ``num_lanes`` lanes, each trajectory cut into
    consecutive chunks of at most ``sequence_length`` steps kept together in one lane.

    A trajectory goes to the lane with the fewest chunks so far (lowest index on ties), so lanes
    end within about one trajectory of each other. Step ``s`` of training takes chunk ``s`` of
    every lane; a chunk with ``start == 0`` resets that lane's LSTM state.
    """
    lanes: list[list[Chunk]] = [[] for _ in range(num_lanes)]
    for j in order:
        n = int(lengths[j])
        if n <= 0:
            continue
        lane = int(np.argmin([len(chunks) for chunks in lanes]))
        lanes[lane].extend(Chunk(int(j), s, min(s + sequence_length, n))
                           for s in range(0, n, sequence_length))
    return lanes


@dataclass
class _Split:
    """One split's steps concatenated: row ``offsets[j] + t`` is step ``t`` of trajectory
    ``j``; a final all-zero row (index ``num_steps``) serves as padding."""

    obs: th.Tensor
    acts: th.Tensor
    returns: th.Tensor | None
    lengths: np.ndarray
    offsets: np.ndarray
    ties: np.ndarray | None  # (num_steps, num_actions) bool
    targets: th.Tensor | None = None  # (num_steps + 1, num_actions) float, rows sum to 1
    trajectory_ids: list[int] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class _Batch:
    rows: th.Tensor       # (B * L,) indices into the split, padding -> num_steps
    mask: th.Tensor       # (B * L,) 1.0 for real steps
    first: th.Tensor      # (B,) True where the lane starts a trajectory (or is empty)
    num_lanes: int


# --------------------------------------------------------------------------------- trainer
class SequenceBC:
    """Behaviour cloning of heuristic demonstrations into an SB3 actor-critic policy.

    :param policy: the policy to train in place: sb3-contrib's ``RecurrentActorCriticPolicy``
        (what ``RecurrentPPO("MlpLstmPolicy", ...)`` builds, or a subclass) or SB3's
        feed-forward ``ActorCriticPolicy``; ``Discrete`` actions.
    :param trajectories: demonstrations; ``obs`` has ``len(acts) + 1`` (or ``len(acts)``) rows
        of raw environment observations, only the first ``len(acts)`` are used.
    :param rng: source of the train/validation split and of every shuffle.
    :param obs_normalizer: the ``VecNormalize`` statistics PPO will run with
        (``fit_obs_normalizer(trajectories)``), or ``None`` to train on raw observations (only
        if PPO runs without observation normalisation). Required, to make the choice explicit.
    :param config: the hyperparameters (:class:`~sb3_warmstart.pipeline.config.BCConfig`: epochs,
        batch size in sequences (lanes; the feed-forward path uses ``batch_size *
        sequence_length`` samples per step), truncated-BPTT length, AdamW rate and weight decay,
        ``constant`` or ``cosine`` schedule (``torch.optim.lr_scheduler.CosineAnnealingLR`` over
        the epochs, stepped once per epoch, down to ``min_learning_rate``), entropy and value
        weights, gradient clip applied separately to the critic's own modules
        (:func:`separately_clipped_critic`) and to all others, so a large value error never
        shrinks the imitation gradient).
    :param validation_fraction: fraction of whole trajectories held out for validation
        (rounded; at least one each side when > 0).
    :param value_pretraining: also fit the value head on discounted returns of the demonstration
        rewards (needs ``rews``). Without it the critic's parameters get no gradient.
    :param gamma: discount factor of those returns (per step); use PPO's ``gamma``.
    :param return_normalizer: normalise rewards like ``VecNormalize(norm_reward=True)`` before
        discounting (``fit_return_normalizer``); ``None`` fits raw rewards.
    :param tied_choices: maps a raw observation to the actions the expert rule considers
        equally good (e.g. :class:`RouterTies`), for tie-aware validation accuracy; or one
        such function per trajectory (demonstrations with a different expert per trajectory).
    :param progress: show the epochs' progress (a bar on a terminal, a line every 10 s when
        the output is piped; :mod:`sb3_warmstart.pipeline.progress`).
    :param logger: SB3 logger; every epoch's metrics are recorded and dumped at step = epoch.
    :param action_targets: per trajectory, ``(len(acts), num_actions)`` distributions over
        the actions (rows summing to 1) to learn instead of the recorded actions, e.g. the
        cost-sensitive labels of :func:`~sb3_warmstart.warmstart.dagger.soft_labels`; a
        ``None`` entry stands for the one-hot recorded actions. Accuracy is still measured
        against the recorded actions.
    """

    def __init__(
        self,
        *,
        policy: ActorCriticPolicy,
        trajectories: Sequence[Trajectory],
        rng: np.random.Generator,
        obs_normalizer: ObsNormalizer | RunningMeanStd | None,
        config: BCConfig,
        validation_fraction: float,
        value_pretraining: bool,
        gamma: float,
        return_normalizer: ReturnNormalizer | None = None,
        tied_choices: Callable[[np.ndarray], np.ndarray]
        | Sequence[Callable[[np.ndarray], np.ndarray]] | None = None,
        progress: bool = False,
        logger: Logger | None = None,
        action_targets: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        if not isinstance(policy, ActorCriticPolicy):
            raise TypeError(f"policy: expected an SB3 ActorCriticPolicy or sb3-contrib "
                            f"RecurrentActorCriticPolicy, got {type(policy).__name__}")
        if not isinstance(policy.action_space, spaces.Discrete):
            raise TypeError(f"policy.action_space={policy.action_space}: only Discrete actions")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected np.random.Generator, got {type(rng).__name__}")
        if not isinstance(config, BCConfig):
            raise TypeError(f"config: expected a BCConfig, got {type(config).__name__}")
        _require(0.0 <= validation_fraction < 1.0, "validation_fraction", validation_fraction,
                 "must be in [0, 1)")
        _require(0.0 <= gamma <= 1.0, "gamma", gamma, "must be in [0, 1]")

        self.policy = policy
        self.recurrent = isinstance(policy, RecurrentActorCriticPolicy)
        self.num_actions = int(policy.action_space.n)
        self.rng = rng
        if isinstance(obs_normalizer, RunningMeanStd):
            obs_normalizer = ObsNormalizer(obs_normalizer)
        self.obs_normalizer = obs_normalizer
        self.config = config
        self.validation_fraction = validation_fraction
        self.value_pretraining = value_pretraining
        self.gamma = gamma
        self.return_normalizer = return_normalizer
        self.tied_choices = tied_choices
        self.progress = progress
        self.logger = logger
        self.loss_calculator = BCLossCalculator(ent_coef=config.ent_coef, vf_coef=config.vf_coef)
        self.device = policy.device

        trajectories = list(trajectories)
        if isinstance(tied_choices, Sequence) and len(tied_choices) != len(trajectories):
            raise ValueError(f"tied_choices: {len(tied_choices)} tie rules for "
                             f"{len(trajectories)} trajectories (one per trajectory)")
        self._check_trajectories(trajectories)
        self.action_targets = self._checked_targets(action_targets, trajectories)
        n = len(trajectories)
        perm = rng.permutation(n)
        n_val = int(round(validation_fraction * n)) if validation_fraction > 0 else 0
        if validation_fraction > 0:
            if n < 2:
                raise ValueError(f"validation_fraction={validation_fraction}: needs >= 2 "
                                 f"trajectories to split by trajectory, got {n}")
            n_val = min(max(n_val, 1), n - 1)
        val_ids = sorted(int(i) for i in perm[:n_val])
        train_ids = sorted(int(i) for i in perm[n_val:])
        self.train_data = self._build_split(trajectories, train_ids, with_ties=False)
        self.val_data = (self._build_split(trajectories, val_ids, with_ties=True)
                         if val_ids else None)

        critic = separately_clipped_critic(policy)
        self._clip_groups = [[p for p in policy.parameters() if all(p is not c for c in critic)],
                             critic]
        self.optimizer = th.optim.AdamW(policy.parameters(), lr=config.learning_rate,
                                        weight_decay=config.weight_decay)
        self.scheduler = (th.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.epochs, eta_min=config.min_learning_rate)
            if config.lr_schedule == "cosine" else None)
        self.gradient_steps = 0
        self.history: list[BCEpochMetrics] = []

    # ------------------------------------------------------------------ data preparation
    def _check_trajectories(self, trajectories: list) -> None:
        if not trajectories:
            raise ValueError("trajectories: need at least one trajectory")
        shape = self.policy.observation_space.shape
        for i, traj in enumerate(trajectories):
            acts = np.asarray(traj.acts)
            obs = np.asarray(traj.obs)
            if acts.ndim != 1:
                raise ValueError(f"trajectories[{i}].acts: expected shape (T,), got {acts.shape}")
            if obs.shape[0] not in (len(acts), len(acts) + 1) or obs.shape[1:] != shape:
                raise ValueError(f"trajectories[{i}].obs: shape {obs.shape}, expected "
                                 f"({len(acts)} + 1, *{shape}) for {len(acts)} actions")
            if len(acts) and (acts.min() < 0 or acts.max() >= self.num_actions
                              or not np.all(acts == np.round(acts))):
                raise ValueError(f"trajectories[{i}].acts: values must be integers in "
                                 f"[0, {self.num_actions - 1}]")
            if self.value_pretraining and getattr(traj, "rews", None) is None:
                raise ValueError(f"value_pretraining=True: trajectories[{i}] has no rews "
                                 "(need imitation TrajectoryWithRew)")

    def _checked_targets(self, targets: Sequence[np.ndarray | None] | None,
                         trajectories: list) -> list[np.ndarray | None] | None:
        if targets is None or all(t is None for t in targets):
            return None
        if len(targets) != len(trajectories):
            raise ValueError(f"action_targets: {len(targets)} entries for "
                             f"{len(trajectories)} trajectories (one per trajectory)")
        out: list[np.ndarray | None] = []
        for j, (t, traj) in enumerate(zip(targets, trajectories)):
            if t is None:
                out.append(None)
                continue
            t = np.asarray(t, dtype=np.float32)
            shape = (len(traj.acts), self.num_actions)
            _require(t.shape == shape, f"action_targets[{j}].shape", t.shape,
                     f"must be {shape} (steps, actions)")
            _require(bool(np.all(t >= 0)) and np.allclose(t.sum(axis=1), 1.0, atol=1e-4),
                     f"action_targets[{j}]", "rows", "must be distributions (>= 0, sum 1)")
            out.append(t)
        return out

    def _build_split(self, trajectories: list, ids: list[int], with_ties: bool) -> _Split:
        obs_parts, act_parts, ret_parts, tie_parts = [], [], [], []
        target_parts = []
        lengths = []
        for j in ids:
            traj = trajectories[j]
            raw = acting_observations(traj)
            obs_parts.append(self.obs_normalizer(raw) if self.obs_normalizer is not None
                             else raw.astype(np.float32))
            act_parts.append(np.asarray(traj.acts, dtype=np.int64))
            lengths.append(len(traj.acts))
            if self.action_targets is not None:
                given = self.action_targets[j]
                if given is None:
                    given = np.eye(self.num_actions, dtype=np.float32)[act_parts[-1]]
                target_parts.append(given)
            if self.value_pretraining:
                rews = np.asarray(traj.rews, dtype=np.float64)
                if self.return_normalizer is not None:
                    rews = self.return_normalizer(rews)
                ret_parts.append(discounted_returns(rews, self.gamma))
            if with_ties and self.tied_choices is not None:
                rule = (self.tied_choices[j] if isinstance(self.tied_choices, Sequence)
                        else self.tied_choices)
                ties = np.zeros((len(raw), self.num_actions), dtype=bool)
                for t, row in enumerate(raw):
                    ties[t, np.asarray(rule(row), dtype=np.int64)] = True
                tie_parts.append(ties)
        dim = self.policy.observation_space.shape
        pad_obs = np.zeros((1, *dim), np.float32)
        obs = np.concatenate(obs_parts + [pad_obs]).astype(np.float32)
        acts = np.concatenate(act_parts + [np.zeros(1, np.int64)])
        returns = (np.concatenate(ret_parts + [np.zeros(1)]).astype(np.float32)
                   if self.value_pretraining else None)
        targets = (np.concatenate(target_parts + [np.eye(self.num_actions, dtype=np.float32)[:1]])
                   if target_parts else None)
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64)
        dev = self.device
        return _Split(
            obs=th.as_tensor(obs, device=dev), acts=th.as_tensor(acts, device=dev),
            returns=th.as_tensor(returns, device=dev) if returns is not None else None,
            lengths=lengths_arr, offsets=offsets,
            ties=np.concatenate(tie_parts) if tie_parts else None,
            targets=th.as_tensor(targets, device=dev) if targets is not None else None,
            trajectory_ids=list(ids))

    # ---------------------------------------------------------------------------- batches
    def _chunk_batches(self, split: _Split, order: Sequence[int], sequence_length: int
                       ) -> Iterator[_Batch]:
        """Recurrent batches: step ``s`` takes chunk ``s`` of every lane."""
        lanes = plan_lanes(split.lengths, order, sequence_length, self.config.batch_size)
        lanes = [lane for lane in lanes if lane] or lanes[:1]
        steps = max(len(lane) for lane in lanes)
        span = np.arange(sequence_length)
        pad = split.num_steps
        for s in range(steps):
            starts = np.full(len(lanes), pad, dtype=np.int64)
            sizes = np.zeros(len(lanes), dtype=np.int64)
            first = np.ones(len(lanes), dtype=bool)
            for k, lane in enumerate(lanes):
                if s < len(lane):
                    c = lane[s]
                    starts[k] = split.offsets[c.trajectory] + c.start
                    sizes[k] = c.stop - c.start
                    first[k] = c.start == 0
            valid = span[None, :] < sizes[:, None]
            rows = np.where(valid, starts[:, None] + span[None, :], pad)
            yield _Batch(rows=th.as_tensor(rows.reshape(-1), device=self.device),
                         mask=th.as_tensor(valid.reshape(-1), dtype=th.float32,
                                           device=self.device),
                         first=th.as_tensor(first, device=self.device), num_lanes=len(lanes))

    def _flat_batches(self, split: _Split, rows: np.ndarray) -> Iterator[_Batch]:
        size = self.config.batch_size * self.config.sequence_length
        for i in range(0, len(rows), size):
            r = th.as_tensor(rows[i:i + size], device=self.device)
            yield _Batch(rows=r, mask=th.ones(len(r), device=self.device),
                         first=th.ones(1, dtype=th.bool, device=self.device), num_lanes=len(r))

    def _train_batches(self) -> Iterator[_Batch]:
        split = self.train_data
        if self.recurrent:
            order = self.rng.permutation(len(split.lengths))
            return self._chunk_batches(split, order, self.config.sequence_length)
        return self._flat_batches(split, self.rng.permutation(split.num_steps))

    def _eval_batches(self, split: _Split, sequence_length: int | None = None
                      ) -> Iterator[_Batch]:
        if self.recurrent:
            length = sequence_length or max(int(split.lengths.max()), 1)
            return self._chunk_batches(split, range(len(split.lengths)), length)
        return self._flat_batches(split, np.arange(split.num_steps))

    # ---------------------------------------------------------------------------- forward
    def _zero_states(self, num_lanes: int) -> RNNStates:
        p = self.policy
        shape = (p.lstm_actor.num_layers, num_lanes, p.lstm_actor.hidden_size)
        z = th.zeros(shape, device=self.device)
        return RNNStates((z, z.clone()), (z.clone(), z.clone()))

    def _forward(self, obs: th.Tensor, states: RNNStates | None, with_values: bool
                 ) -> tuple[Distribution, th.Tensor | None, RNNStates | None]:
        """Action distribution (and values) for a batch, through the policy's own modules.

        Recurrent: ``obs`` holds ``num_lanes`` sequences of equal length back to back and
        ``states`` their initial LSTM states (already zeroed where a trajectory starts), so no
        step inside is an episode start; mirrors ``RecurrentActorCriticPolicy.forward``.
        Feed-forward: mirrors ``ActorCriticPolicy.evaluate_actions``.
        """
        p = self.policy
        features = p.extract_features(obs)
        pi_features, vf_features = ((features, features) if p.share_features_extractor
                                    else features)
        values = None
        if not self.recurrent:
            latent_pi = p.mlp_extractor.forward_actor(pi_features)
            if with_values:
                values = p.value_net(p.mlp_extractor.forward_critic(vf_features)).flatten()
            return p._get_action_dist_from_latent(latent_pi), values, None
        assert states is not None
        no_starts = th.zeros(obs.shape[0], device=obs.device)
        latent_pi, pi_states = p._process_sequence(pi_features, states.pi, no_starts,
                                                   p.lstm_actor)
        vf_states = states.vf
        if with_values:
            if p.lstm_critic is not None:
                latent_vf, vf_states = p._process_sequence(vf_features, states.vf, no_starts,
                                                           p.lstm_critic)
            elif p.shared_lstm:  # the critic reads the actor's LSTM without backpropagating
                latent_vf = latent_pi.detach()
            else:
                latent_vf = p.critic(vf_features)
            values = p.value_net(p.mlp_extractor.forward_critic(latent_vf)).flatten()
        latent_pi = p.mlp_extractor.forward_actor(latent_pi)
        return p._get_action_dist_from_latent(latent_pi), values, RNNStates(pi_states, vf_states)

    @staticmethod
    def _carry(states: RNNStates, first: th.Tensor) -> RNNStates:
        """Detach states from the previous chunk; zero lanes that start a trajectory."""
        keep = (~first).to(states.pi[0].dtype).view(1, -1, 1)
        return RNNStates(*(tuple(x.detach() * keep for x in pair)
                           for pair in (states.pi, states.vf)))

    def _run(self, batches: Iterator[_Batch], split: _Split, train: bool, with_values: bool
             ) -> Iterator[tuple[_Batch, Distribution, th.Tensor | None]]:
        states = None
        for batch in batches:
            if self.recurrent:
                if states is None:
                    states = self._zero_states(batch.num_lanes)
                states = self._carry(states, batch.first)
            obs = split.obs[batch.rows]
            with th.set_grad_enabled(train):
                dist, values, new_states = self._forward(obs, states, with_values)
            states = new_states
            yield batch, dist, values

    # ----------------------------------------------------------------------------- train
    def train(self) -> list[BCEpochMetrics]:
        """Run the epochs not run yet (all ``epochs`` on the first call, none afterwards, so the
        learning-rate schedule never runs past its end); returns (and appends to ``history``)
        one record per epoch run."""
        from sb3_warmstart.pipeline.progress import ProgressPrinter

        remaining = self.config.epochs - len(self.history)
        printer = ProgressPrinter("BC", self.config.epochs, "epochs", initial=len(self.history),
                                  enabled=self.progress)
        new: list[BCEpochMetrics] = []
        for _ in range(remaining):
            metrics = self._train_epoch()
            new.append(metrics)
            self.history.append(metrics)
            if self.logger is not None:
                metrics.record(self.logger)
                self.logger.dump(step=metrics.epoch)
            printer.update(len(self.history), format_epoch_short(metrics))
        printer.close()
        return new

    def _train_epoch(self) -> BCEpochMetrics:
        start = time.perf_counter()
        self.policy.set_training_mode(True)
        lr = self.optimizer.param_groups[0]["lr"]
        sums = {"neglogp": 0.0, "entropy": 0.0, "value_loss": 0.0, "total": 0.0}
        correct = total_steps = steps = 0
        split = self.train_data
        for batch, dist, values in self._run(self._train_batches(), split, train=True,
                                             with_values=self.value_pretraining):
            acts = split.acts[batch.rows]
            returns = split.returns[batch.rows] if split.returns is not None else None
            targets = split.targets[batch.rows] if split.targets is not None else None
            loss = self.loss_calculator(dist, acts, values, returns, batch.mask, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if self.config.max_grad_norm is not None:
                for group in self._clip_groups:
                    th.nn.utils.clip_grad_norm_(group, self.config.max_grad_norm)
            self.optimizer.step()
            for k, v in loss.floats().items():
                sums[k] += v
            with th.no_grad():
                hit = (dist.mode() == acts).float() * batch.mask
            correct += int(hit.sum())
            total_steps += int(batch.mask.sum())
            steps += 1
        self.gradient_steps += steps
        if self.scheduler is not None:
            self.scheduler.step()
        val = self.evaluate() if self.val_data is not None else None
        mean = {k: v / max(steps, 1) for k, v in sums.items()}
        return BCEpochMetrics(
            epoch=len(self.history) + 1, gradient_steps=self.gradient_steps, learning_rate=lr,
            train_neglogp=mean["neglogp"], train_entropy=mean["entropy"],
            train_value_loss=mean["value_loss"] if self.value_pretraining else float("nan"),
            train_loss=mean["total"], train_accuracy=correct / max(total_steps, 1), val=val,
            wall_time_s=time.perf_counter() - start)

    # -------------------------------------------------------------------------- evaluate
    def predict_split(self, split: Literal["train", "val"] = "val",
                      sequence_length: int | None = None) -> dict[str, np.ndarray]:
        """Per-step argmax action, expert log-likelihood and value of a split, in split order.

        Each trajectory starts from a zero LSTM state, as at rollout time. ``sequence_length``
        runs it in chunks of that many steps with the state carried across chunks (the training
        layout); ``None`` runs whole trajectories. Both give the same numbers up to float error.
        """
        data = self.train_data if split == "train" else self.val_data
        if data is None:
            raise ValueError(f"split={split!r}: no validation trajectories "
                             f"(validation_fraction={self.validation_fraction})")
        if sequence_length is not None:
            _require(isinstance(sequence_length, int) and sequence_length >= 1,
                     "sequence_length", sequence_length, "must be an int >= 1 steps")
        n = data.num_steps
        pred = np.zeros(n, np.int64)
        logp = np.zeros(n, np.float64)
        value = np.full(n, np.nan)
        self.policy.set_training_mode(False)
        for batch, dist, values in self._run(self._eval_batches(data, sequence_length), data,
                                             train=False, with_values=self.value_pretraining):
            valid = batch.mask.bool()
            rows = batch.rows[valid].cpu().numpy()
            pred[rows] = dist.mode()[valid].cpu().numpy()
            logp[rows] = dist.log_prob(data.acts[batch.rows])[valid].cpu().numpy()
            if values is not None:
                value[rows] = values[valid].cpu().numpy()
        return {"pred": pred, "logp": logp, "value": value}

    def evaluate(self, split: Literal["train", "val"] = "val") -> BCEvalMetrics:
        """Accuracy, tie-aware accuracy, NLL, value error and action shares on a split."""
        data = self.train_data if split == "train" else self.val_data
        out = self.predict_split(split)
        assert data is not None
        acts = data.acts[:-1].cpu().numpy()
        pred = out["pred"]
        n = len(acts)
        tie_acc = (float(data.ties[np.arange(n), pred].mean())
                   if data.ties is not None and n else float("nan"))
        if self.value_pretraining and data.returns is not None:
            value_loss = float(np.mean((out["value"] - data.returns[:-1].cpu().numpy()) ** 2))
        else:
            value_loss = float("nan")
        k = self.num_actions
        return BCEvalMetrics(
            accuracy=float(np.mean(pred == acts)) if n else float("nan"),
            tie_accuracy=tie_acc,
            nll=float(-out["logp"].mean()) if n else float("nan"),
            value_loss=value_loss,
            predicted_share=tuple(float(x) for x in np.bincount(pred, minlength=k) / max(n, 1)),
            expert_share=tuple(float(x) for x in np.bincount(acts, minlength=k) / max(n, 1)),
            num_steps=n)


def separately_clipped_critic(policy: ActorCriticPolicy) -> list[th.nn.Parameter]:
    """The critic parameters behaviour cloning clips apart from all others: the
    :func:`~sb3_warmstart.policies.parameters.critic_only_parameters` of SB3's critic modules
    (``value_net``, ``mlp_extractor.value_net``, ``lstm_critic``, ``critic``, a separate
    ``vf_features_extractor``). The replica-set heads' value MLP (``mlp_extractor.value``)
    stays in the joint clip: its gradient reaches the shared, trained replica encoder anyway,
    so clipping the head apart cannot keep the value error off the imitation gradient, and when
    tried (2026-12-05, three training seeds, docs/ppo_credit.md) it left the distilled policy
    level (+0.02% [-0.05, +0.09]) and PPO from it 0.30% worse on two of three seeds."""
    shared_head = {id(p) for name, p in policy.named_parameters()
                   if name.startswith("mlp_extractor.value.")}
    return [p for p in critic_only_parameters(policy) if id(p) not in shared_head]


def format_epoch_short(m: BCEpochMetrics) -> str:
    """The epoch's loss and accuracies, for a progress line."""
    text = f"loss {m.train_loss:.4f}, acc {m.train_accuracy:.3f}"
    if m.val is not None:
        text += f", val acc {m.val.accuracy:.3f}"
        if not math.isnan(m.val.tie_accuracy):
            text += f" (tie-aware {m.val.tie_accuracy:.3f})"
    return text


def format_epoch(m: BCEpochMetrics) -> str:
    """One line per epoch for the console."""
    line = (f"epoch {m.epoch:3d}  lr {m.learning_rate:.2e}  loss {m.train_loss:.4f}  "
            f"nll {m.train_neglogp:.4f}  acc {m.train_accuracy:.3f}")
    if not math.isnan(m.train_value_loss):
        line += f"  vloss {m.train_value_loss:.3f}"
    if m.val is not None:
        line += f"  | val acc {m.val.accuracy:.3f}"
        if not math.isnan(m.val.tie_accuracy):
            line += f"  tie-acc {m.val.tie_accuracy:.3f}"
        line += f"  nll {m.val.nll:.4f}"
        if not math.isnan(m.val.value_loss):
            line += f"  vloss {m.val.value_loss:.3f}"
    return line + f"  ({m.wall_time_s:.1f} s)"


class RouterTies:
    """``tied_choices`` for :class:`SequenceBC` from a heuristic router: a raw observation ->
    the replicas the router's rule considers equally good.

    :param router: a router with ``tied_choices(view)`` (``llm_cluster_env.routing.heuristics``).
    :param layout: the env's ``ObservationLayout`` (``env.unwrapped.layout``).
    """

    def __init__(self, router, layout) -> None:
        self.router = router
        self.layout = layout

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        ties = self.router.tied_choices(self.layout.view(obs))
        if ties is None:
            raise ValueError(f"router {self.router!r} has no tie set (not a function of the "
                             "observation); pass tied_choices=None")
        return ties

    def __repr__(self) -> str:
        return f"RouterTies({self.router!r})"


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {rule}")


__all__ = [
    "PRESETS",
    "BCEpochMetrics",
    "BCEvalMetrics",
    "BCLoss",
    "BCLossCalculator",
    "BCPreset",
    "Chunk",
    "ObsNormalizer",
    "ReturnNormalizer",
    "RouterTies",
    "SequenceBC",
    "discounted_returns",
    "critic_only_parameters",
    "separately_clipped_critic",
    "format_epoch",
    "plan_lanes",
]
