"""Rollout buffers of the recurrent PPO: sb3-contrib's layout with reference logits, and whole
sequences padded once per rollout.

:class:`RefLogitsRecurrentRolloutBuffer` is sb3-contrib's ``RecurrentRolloutBuffer`` (2.9.2)
plus the reference policy's log-probabilities per entry: minibatches are runs of consecutive
entries (env-major, the start rotated at random each epoch), cut into sequences where an episode
or an environment starts and padded *per minibatch*. A sequence that starts an episode begins
with ``episode_start = 1`` and the policy's LSTM steps through the minibatch one time step at a
time in Python to reset its state there: that loop is most of RecurrentPPO's training time.

:class:`SequenceRolloutBuffer` builds the sequences once per rollout:

1. the rollout (``n_steps`` per env, env-major) is cut where an environment's rollout begins,
   where an episode starts, and every ``sequence_length`` steps inside an episode
   (:class:`SequenceLayout`);
2. every per-step array is gathered once into ``(n_sequences, sequence_length, ...)`` tensors
   (zero padding after a short sequence's end, masked out of every loss);
3. each sequence's initial recurrent state is the one the rollout stored at its first step,
   **zeroed when that step starts an episode** -- exactly what the step-by-step reset would do
   there, and the only place a reset can happen, since sequences are cut at episode starts. So
   ``episode_starts`` is all zero in every minibatch and the policy's recurrent network runs
   over the whole minibatch in one call (sb3-contrib's ``_process_sequence`` takes its
   single-call branch);
4. each epoch, the sequences are shuffled with the generator given and dealt to
   ``ceil(valid_steps / batch_size)`` minibatches, each to the one with the fewest steps so far
   (as many minibatches, hence optimiser steps, as the stock buffer gives). A minibatch is the
   rows of its sequences, trimmed to the longest of them.

Against sb3-contrib's buffer the minibatches are made of other transitions (whole sequences,
shuffled) and sequences are also cut every ``sequence_length`` steps (gradients are truncated
there; the forward pass still starts from the state the rollout stored, as sb3-contrib does at
its cuts). On the same transitions, cut the same way, the losses and gradients are those of
sb3-contrib (tested to 1e-5).

Units: steps are env steps of one environment; ``batch_size`` counts valid steps (transitions).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from stable_baselines3.common.vec_env import VecNormalize

#: Per-step arrays of a recurrent rollout buffer (each ``(n_steps, n_envs, ...)`` while filling).
_STEP_ARRAYS = ("observations", "actions", "values", "log_probs", "advantages", "returns",
                "episode_starts")
#: Stored recurrent states, each ``(n_steps, n_layers, n_envs, hidden)`` while filling.
_STATE_ARRAYS = ("hidden_states_pi", "cell_states_pi", "hidden_states_vf", "cell_states_vf")


class RecurrentRolloutBufferSamplesWithRef(NamedTuple):
    """sb3-contrib's ``RecurrentRolloutBufferSamples`` plus the reference's log-probabilities
    (padded and flattened like ``old_log_prob``: ``(padded_batch, n_actions)``, or None)."""

    observations: th.Tensor
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    lstm_states: RNNStates
    episode_starts: th.Tensor
    mask: th.Tensor
    ref_logits: th.Tensor | None


class RefLogitsRecurrentRolloutBuffer(RecurrentRolloutBuffer):
    """``RecurrentRolloutBuffer`` that also carries reference log-probabilities per entry.

    ``ref_logits`` is None, or an array ``(n_steps, n_envs, n_actions)`` set after the rollout
    (by :class:`~sb3_warmstart.algorithms.ppo.KLRecurrentPPO`); ``get()`` flattens it env-major like every
    other per-step array and each minibatch pads it along the same sequences. Sampling draws
    the same random numbers as the parent, so minibatches are identical.
    """

    def reset(self) -> None:
        super().reset()
        self.ref_logits: np.ndarray | None = None

    def set_reference_logits(self, ref_logits: np.ndarray) -> None:
        expected = (self.buffer_size, self.n_envs, int(self.action_space.n))
        if self.generator_ready or ref_logits.shape != expected:
            raise ValueError(f"ref_logits shape {ref_logits.shape}: expected {expected} on a "
                             f"buffer not yet sampled")
        self.ref_logits = ref_logits.astype(np.float32, copy=False)

    def get(self, batch_size: int | None = None
            ) -> Generator[RecurrentRolloutBufferSamplesWithRef, None, None]:
        if not self.generator_ready and self.ref_logits is not None:
            self.ref_logits = self.swap_and_flatten(self.ref_logits)
        yield from super().get(batch_size)

    def _get_samples(self, batch_inds: np.ndarray, env_change: np.ndarray,
                     env: VecNormalize | None = None) -> RecurrentRolloutBufferSamplesWithRef:
        samples = super()._get_samples(batch_inds, env_change, env)
        ref = None
        if self.ref_logits is not None:
            ref = self.pad(self.ref_logits[batch_inds]).reshape(-1, self.ref_logits.shape[-1])
        return RecurrentRolloutBufferSamplesWithRef(*samples, ref_logits=ref)


@dataclass(frozen=True)
class SequenceLayout:
    """Where the sequences of one rollout lie in the env-major flat buffer (index
    ``env * n_steps + t`` is step ``t`` of environment ``env``).

    :param starts: ``(n_sequences,)`` flat index of each sequence's first step, ascending.
    :param lengths: ``(n_sequences,)`` steps in each sequence (1 to ``sequence_length``).
    :param resets: ``(n_sequences,)`` True where the first step starts an episode (the
        sequence starts from a zero recurrent state).
    :param sequence_length: the longest a sequence may be (steps).
    """

    starts: np.ndarray
    lengths: np.ndarray
    resets: np.ndarray
    sequence_length: int

    @classmethod
    def from_episode_starts(cls, episode_starts: np.ndarray, sequence_length: int
                            ) -> SequenceLayout:
        """Cut a rollout into sequences (module docs, step 1).

        :param episode_starts: ``(n_steps, n_envs)``, nonzero where a step starts an episode.
        :param sequence_length: the longest sequence, steps (>= 1).
        """
        if not (isinstance(sequence_length, (int, np.integer)) and sequence_length >= 1):
            raise ValueError(f"sequence_length={sequence_length!r}: must be an integer >= 1")
        n_steps, n_envs = episode_starts.shape
        starts_flat = np.asarray(episode_starts).T.reshape(-1) != 0  # env-major
        boundary = starts_flat.copy()
        boundary[::n_steps] = True  # each environment's rollout begins a segment
        segment_starts = np.flatnonzero(boundary)
        segment_ends = np.append(segment_starts[1:], n_steps * n_envs)
        pieces = -(-(segment_ends - segment_starts) // sequence_length)  # ceil
        first_piece = np.cumsum(pieces) - pieces
        offset = (np.arange(int(pieces.sum())) - np.repeat(first_piece, pieces)) * sequence_length
        starts = np.repeat(segment_starts, pieces) + offset
        lengths = np.minimum(sequence_length, np.repeat(segment_ends, pieces) - starts)
        return cls(starts=starts, lengths=lengths, resets=starts_flat[starts],
                   sequence_length=int(sequence_length))

    @property
    def num_sequences(self) -> int:
        return len(self.starts)

    def step_index(self, pad_index: int) -> np.ndarray:
        """``(n_sequences, sequence_length)`` flat indices of every sequence's steps, with
        ``pad_index`` after a sequence's end."""
        span = np.arange(self.sequence_length)
        return np.where(span[None, :] < self.lengths[:, None],
                        self.starts[:, None] + span[None, :], pad_index)

    def minibatches(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffle the sequences and deal them to ``ceil(steps / batch_size)`` minibatches,
        each sequence to the minibatch with the fewest steps so far (lowest index on ties).

        :return: the sequence indices of each minibatch (none empty), in dealing order.
        """
        order = rng.permutation(self.num_sequences)
        count = min(self.num_sequences, max(1, math.ceil(int(self.lengths.sum()) / batch_size)))
        fill = np.zeros(count, dtype=np.int64)
        members: list[list[int]] = [[] for _ in range(count)]
        for sequence in order:
            target = int(np.argmin(fill))
            members[target].append(int(sequence))
            fill[target] += self.lengths[sequence]
        return [np.asarray(m, dtype=np.int64) for m in members]


class SequenceRolloutBuffer(RefLogitsRecurrentRolloutBuffer):
    """A recurrent rollout buffer whose sequences are padded once per rollout and sampled whole
    (module docs).

    Fills exactly like sb3-contrib's ``RecurrentRolloutBuffer`` (so ``RecurrentPPO``'s rollout
    collection and :meth:`set_reference_logits` work unchanged); the first ``get()`` after a
    rollout builds :attr:`layout` and the padded tensors.

    :param sequence_length: the longest sequence, steps (>= 1); gradients through the recurrent
        state are truncated at this length.
    :param rng: shuffles the sequences each epoch (the caller keeps its state for resumes).

    The other parameters are those of ``RecurrentRolloutBuffer``.
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Space,
                 action_space: spaces.Space, hidden_state_shape: tuple[int, int, int, int],
                 device: th.device | str = "auto", gae_lambda: float = 1, gamma: float = 0.99,
                 n_envs: int = 1, *, sequence_length: int, rng: np.random.Generator) -> None:
        if not (isinstance(sequence_length, (int, np.integer)) and sequence_length >= 1):
            raise ValueError(f"sequence_length={sequence_length!r}: must be an integer >= 1")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected np.random.Generator, got {type(rng).__name__}")
        if not isinstance(observation_space, spaces.Box):
            raise ValueError(f"observation_space={observation_space}: sequence batching "
                             f"supports Box observations only")
        self.sequence_length = int(sequence_length)
        self.rng = rng
        super().__init__(buffer_size, observation_space, action_space, hidden_state_shape,
                         device, gae_lambda, gamma, n_envs)

    def reset(self) -> None:
        super().reset()
        self.layout: SequenceLayout | None = None
        self._padded: dict[str, th.Tensor] = {}

    def _build_sequences(self) -> None:
        """Module docs, steps 1-3: flatten env-major, cut, gather once into padded tensors."""
        layout = SequenceLayout.from_episode_starts(self.episode_starts, self.sequence_length)
        # (n_steps, n_layers, n_envs, hidden) -> (n_steps, n_envs, n_layers, hidden)
        for name in _STATE_ARRAYS:
            self.__dict__[name] = self.__dict__[name].swapaxes(1, 2)
        # (n_steps, n_envs, ...) -> (n_envs * n_steps, ...), keeping each env's time order
        for name in _STEP_ARRAYS + _STATE_ARRAYS:
            self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
        if self.ref_logits is not None:
            self.ref_logits = self.swap_and_flatten(self.ref_logits)
        total = self.buffer_size * self.n_envs
        index = th.as_tensor(layout.step_index(pad_index=total), device=self.device)

        def padded(array: np.ndarray) -> th.Tensor:
            flat = th.as_tensor(array.reshape(total, -1), dtype=th.float32, device=self.device)
            flat = th.cat([flat, flat.new_zeros((1, flat.shape[1]))])  # the padding row
            return flat[index]  # (n_sequences, sequence_length, width)

        tensors = {
            "observations": padded(self.observations),
            "actions": padded(self.actions),
            "old_values": padded(self.values)[..., 0],
            "old_log_prob": padded(self.log_probs)[..., 0],
            "advantages": padded(self.advantages)[..., 0],
            "returns": padded(self.returns)[..., 0],
            "mask": (index < total).to(th.float32),
        }
        if self.ref_logits is not None:
            tensors["ref_logits"] = padded(self.ref_logits)
        keep = th.as_tensor(~layout.resets, dtype=th.float32, device=self.device)
        for name in _STATE_ARRAYS:  # the state before each sequence, zeroed at episode starts
            first = th.as_tensor(self.__dict__[name][layout.starts], device=self.device)
            tensors[name] = first * keep.view(-1, 1, 1)  # (n_sequences, n_layers, hidden)
        self.layout = layout
        self._padded = tensors
        self.generator_ready = True

    def get(self, batch_size: int | None = None
            ) -> Generator[RecurrentRolloutBufferSamplesWithRef, None, None]:
        """One epoch: every sequence once, in minibatches of about ``batch_size`` steps (all
        in one minibatch when ``batch_size`` is None)."""
        assert self.full, "Rollout buffer must be full before sampling from it"
        if not self.generator_ready:
            self._build_sequences()
        assert self.layout is not None
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        for members in self.layout.minibatches(batch_size, self.rng):
            yield self.sequences(members)

    def sequences(self, members: np.ndarray) -> RecurrentRolloutBufferSamplesWithRef:
        """The minibatch of the sequences ``members`` (indices into :attr:`layout`), in that
        order, each padded to the longest of them; flattened sequence-major as sb3-contrib's
        policies expect (``(n_seq * length, ...)``), ``episode_starts`` all zero."""
        assert self.layout is not None
        length = int(self.layout.lengths[members].max())
        ids = th.as_tensor(members, device=self.device)
        t = self._padded

        def rows(name: str) -> th.Tensor:
            block = t[name][ids, :length]
            return block.reshape(len(members) * length, *block.shape[2:])

        def states(hidden: str, cell: str) -> tuple[th.Tensor, th.Tensor]:
            # (n_seq, n_layers, hidden) -> (n_layers, n_seq, hidden)
            return (t[hidden][ids].swapaxes(0, 1).contiguous(),
                    t[cell][ids].swapaxes(0, 1).contiguous())

        observations = rows("observations").reshape(len(members) * length, *self.obs_shape)
        return RecurrentRolloutBufferSamplesWithRef(
            observations=observations,
            actions=rows("actions"),
            old_values=rows("old_values"),
            old_log_prob=rows("old_log_prob"),
            advantages=rows("advantages"),
            returns=rows("returns"),
            lstm_states=RNNStates(states("hidden_states_pi", "cell_states_pi"),
                                  states("hidden_states_vf", "cell_states_vf")),
            episode_starts=th.zeros(len(members) * length, device=self.device),
            mask=rows("mask"),
            ref_logits=rows("ref_logits") if "ref_logits" in t else None,
        )


__all__ = ["RecurrentRolloutBufferSamplesWithRef", "RefLogitsRecurrentRolloutBuffer",
           "SequenceLayout", "SequenceRolloutBuffer"]
