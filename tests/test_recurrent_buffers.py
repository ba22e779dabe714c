"""Sequence batching for recurrent PPO: the layout, the minibatches, equivalence with
sb3-contrib's buffer, bit-exact resume and gradient checkpointing."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest

th = pytest.importorskip("torch")
pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize  # noqa: E402

import llm_cluster_env  # noqa: E402,F401
from sb3_warmstart.algorithms.kl import ppo_loss_terms  # noqa: E402
from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO  # noqa: E402
from sb3_warmstart.algorithms.recurrent_buffers import (  # noqa: E402
    RefLogitsRecurrentRolloutBuffer,
    SequenceLayout,
    SequenceRolloutBuffer,
)
from sb3_warmstart.common.checkpoint import CheckpointManager, TrainingSession  # noqa: E402
from sb3_warmstart.pipeline.config import (  # noqa: E402
    AdvancedOptimizationConfig,
    GradientOptimizationConfig,
    KLConfig,
)
from sb3_warmstart.policies.recurrent import (  # noqa: E402
    TemperatureMlpGruPolicy,
    TemperatureMlpLstmPolicy,
)
from sb3_warmstart.policies.replica_set import RecurrentReplicaSetPolicy  # noqa: E402

pytestmark = pytest.mark.train

N_STEPS, N_ENVS = 32, 2
ROLLOUT = N_STEPS * N_ENVS
#: The regularised loss of the main job, every term on (values in the tests' own units).
KL_ON = KLConfig(kl_ref_coef_initial=0.5, kl_ref_coef_final=0.5, kl_coef=0.1,
                 entropy_warmup_coef=0.01, warmup_steps=1000, entropy_min=1.3,
                 entropy_floor_coef=0.2)


def make_env(episode_requests: int = 20) -> VecNormalize:
    """Two short-episode environments, observations and rewards normalised as in training."""
    return VecNormalize(DummyVecEnv([partial(gym.make, "LLMCluster-v0",
                                             episode_requests=episode_requests)] * N_ENVS))


def policy_kwargs(policy, env) -> dict:
    kwargs = dict(lstm_hidden_size=8)
    if policy is RecurrentReplicaSetPolicy:
        layout = env.venv.envs[0].unwrapped.layout
        kwargs.update(replica_features=list(layout.replica_features),
                      tail_features=list(layout.names[layout.replica_block:]),
                      embed_dim=8, hidden_dim=8)
    else:
        kwargs.update(net_arch=[8])
    return kwargs


def recurrent(policy=TemperatureMlpLstmPolicy, sequence_length=8, episode_requests=20,
              seed=0, **kw):
    env = make_env(episode_requests)
    args = dict(n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=seed, device="cpu",
                policy_kwargs=policy_kwargs(policy, env), sequence_length=sequence_length)
    args.update(kw)
    return KLRecurrentPPO(policy, env, **args)


def distant_reference(policy_class):
    """A policy of the same architecture, other weights, far from uniform (noised weights)."""
    policy = recurrent(policy_class, seed=1).policy
    generator = th.Generator().manual_seed(1)
    with th.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * th.randn(p.shape, generator=generator))
    return policy


def params(model) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


# ----------------------------------------------------------------------------- layout
def test_layout_cuts_at_env_starts_episode_starts_and_every_sequence_length():
    starts = np.zeros((10, 2))  # (n_steps, n_envs)
    starts[0, 0] = 1  # env 0 starts an episode at its first step
    starts[6, 0] = 1  # ... and at t = 6
    starts[3, 1] = 1  # env 1 at t = 3
    layout = SequenceLayout.from_episode_starts(starts, sequence_length=4)
    # env 0 (flat 0..9): [0,4) [4,6) [6,10); env 1 (flat 10..19): [10,13) [13,17) [17,20)
    assert layout.starts.tolist() == [0, 4, 6, 10, 13, 17]
    assert layout.lengths.tolist() == [4, 2, 4, 3, 4, 3]
    assert layout.resets.tolist() == [True, False, True, False, True, False]
    index = layout.step_index(pad_index=20)
    assert index.shape == (6, 4)
    assert sorted(index[index < 20].tolist()) == list(range(20))  # every step exactly once
    assert index[1].tolist() == [4, 5, 20, 20]
    with pytest.raises(ValueError, match="sequence_length=0"):
        SequenceLayout.from_episode_starts(starts, 0)


def test_minibatches_deal_every_sequence_once_with_balanced_steps(rng):
    starts = (rng.random((64, 4)) < 0.05).astype(float)
    layout = SequenceLayout.from_episode_starts(starts, sequence_length=8)
    batches = layout.minibatches(40, rng)
    assert len(batches) == int(np.ceil(256 / 40)) == 7
    dealt = np.concatenate(batches)
    assert sorted(dealt.tolist()) == list(range(layout.num_sequences))
    fill = [int(layout.lengths[b].sum()) for b in batches]
    assert sum(fill) == 256 and max(fill) - min(fill) <= 8
    again = layout.minibatches(40, np.random.default_rng(12345))
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # shuffled per call
    assert len(layout.minibatches(10_000, rng)) == 1


# ----------------------------------------------------------------------------- equivalence
def filled(model):
    """Fill the model's buffer with one rollout (and the reference's logits), no update."""
    model.updates_deferred = True
    model.learn(ROLLOUT)
    model.updates_deferred = False
    return model.rollout_buffer


def stock_twin(buffer: SequenceRolloutBuffer) -> RefLogitsRecurrentRolloutBuffer:
    """sb3-contrib's buffer (with the reference logits) holding the same rollout, flattened
    the way its ``get()`` flattens it. Call before ``buffer`` is sampled."""
    twin = RefLogitsRecurrentRolloutBuffer(
        buffer.buffer_size, buffer.observation_space, buffer.action_space,
        buffer.hidden_state_shape, buffer.device, gamma=buffer.gamma,
        gae_lambda=buffer.gae_lambda, n_envs=buffer.n_envs)
    for name in ("observations", "actions", "rewards", "returns", "episode_starts", "values",
                 "log_probs", "advantages", "hidden_states_pi", "cell_states_pi",
                 "hidden_states_vf", "cell_states_vf", "ref_logits"):
        setattr(twin, name, copy.deepcopy(getattr(buffer, name)))
    twin.full, twin.pos = True, buffer.pos
    next(twin.get(ROLLOUT))  # flattens env-major (its minibatch is not used)
    return twin


def stock_samples(twin, layout: SequenceLayout, members: np.ndarray):
    """sb3-contrib's minibatch of exactly these sequences: their steps, in this order, a new
    sequence marked at each one's first step (as where an environment changes)."""
    steps = np.concatenate([np.arange(s, s + n) for s, n in
                            zip(layout.starts[members], layout.lengths[members])])
    change = np.zeros((twin.buffer_size * twin.n_envs, 1))  # flattened like its episode_starts
    change[layout.starts] = 1.0
    return twin._get_samples(steps, change)


def loss_and_grads(model, data, step: int):
    """The training loop's loss of one minibatch and its gradient (flat), at the current
    weights."""
    model.policy.zero_grad()
    actions = data.actions.long().flatten()
    values, log_prob, entropy, mask, logits = model._forward_minibatch(data, actions, True)
    terms = ppo_loss_terms(
        log_prob=log_prob, old_log_prob=data.old_log_prob, advantages=data.advantages,
        values_pred=values.flatten(), returns=data.returns, entropy=entropy, clip_range=0.2,
        ent_coef=model.entropy_coef_at(step), vf_coef=0.5, mask=mask, logits=logits,
        ref_logits=data.ref_logits, kl_ref_coef=model.kl_ref_coef_at(step),
        kl_coef=model.kl.kl_coef, entropy_min=model.kl.entropy_min,
        entropy_floor_coef=model.kl.entropy_floor_coef)
    terms.total.backward()
    grads = th.cat([p.grad.flatten() for p in model.policy.parameters() if p.grad is not None])
    return terms.to_floats(), grads


def assert_close_rel(ours: dict, theirs: dict, rel: float) -> None:
    """``rel`` relative; a term near zero (the policy-gradient loss is a mean of O(1)
    normalised advantages that nearly cancel) is compared at ``rel * 1e-2`` = 1e-7 absolute,
    about one float32 rounding of its O(1) summands."""
    for key, value in theirs.items():
        assert abs(ours[key] - value) <= rel * max(abs(value), 1e-2), (key, ours[key], value)


@pytest.mark.parametrize("policy", [TemperatureMlpLstmPolicy, TemperatureMlpGruPolicy,
                                    RecurrentReplicaSetPolicy])
def test_minibatch_losses_and_gradients_equal_sb3_contrib_on_the_same_sequences(policy):
    """Same transitions, same sequences: our padded-once minibatch (one recurrent call, the
    state zeroed at episode starts) and sb3-contrib's padded-per-minibatch one (the policy steps
    through it, resetting where ``episode_start`` is set) give the same loss terms and
    gradients, at the rollout's weights and after each of 8 updates (two epochs)."""
    model = recurrent(policy, kl=KL_ON)
    model.policy.temperature = 1.3
    model.set_reference_policy(distant_reference(policy))
    buffer = filled(model)
    twin = stock_twin(buffer)
    next(buffer.get(16))  # builds the padded sequences (its minibatch is not used)
    layout = buffer.layout
    assert layout.resets[layout.starts % N_STEPS != 0].sum() >= 2  # episodes end inside
    stock_looped = 0
    for step in range(2 * int(np.ceil(ROLLOUT / 16))):
        members = layout.minibatches(16, model._minibatch_rng)[step % 4]
        ours = buffer.sequences(members)
        theirs = stock_samples(twin, layout, members)
        assert th.equal(ours.observations, theirs.observations)
        assert th.equal(ours.mask, theirs.mask) and not ours.episode_starts.any()
        stock_looped += int(theirs.episode_starts.any())
        stock_terms, stock_grads = loss_and_grads(model, theirs, step)
        our_terms, our_grads = loss_and_grads(model, ours, step)
        assert our_terms["kl_ref"] > 0.01 and our_terms["kl_instant"] >= 0.0
        assert_close_rel(our_terms, stock_terms, 1e-5)
        err = float(th.linalg.vector_norm(our_grads - stock_grads))
        assert err <= 1e-5 * float(th.linalg.vector_norm(stock_grads)), step
        model.policy.optimizer.step()  # our gradient moves the weights for the next one
    assert stock_looped >= 2  # sb3-contrib's path did step through episode starts


@pytest.mark.parametrize("sequence_length", [N_STEPS, 4])
def test_extra_cuts_truncate_the_gradient_and_drift_after_updates(sequence_length):
    """Where the split must differ. sb3-contrib, given the whole rollout as one minibatch, cuts
    only where an episode or an environment's rollout starts; we also cut every
    ``sequence_length`` steps. With no extra cut (``sequence_length = n_steps``) the two agree
    to float error, before and after updates. An extra cut restarts the recurrent network from
    the state the rollout stored there:

    * the forward pass is unchanged while the weights are the rollout's (the stored state is the
      one a run through reaches), but the gradient does not flow back through the cut
      (truncated backpropagation through time): measured gradient difference (relative norm)
      5.8% / 3.4% / 1.6% for cuts every 4 / 8 / 16 steps, before any update;
    * after updates the stored states are stale (computed with the old weights), so the losses
      drift apart too, growing with how far the weights moved: 0.23% / 0.08% / 0.04% after 8
      updates at a 1e-3 learning rate.

    Bounds here (cuts every 4 steps): loss equal to 1e-5 before, gradient 0.1-15% apart
    before and after, loss 1e-6-2% apart after."""
    model = recurrent(sequence_length=sequence_length, learning_rate=1e-3)
    buffer = filled(model)
    twin = stock_twin(buffer)
    next(buffer.get(None))
    layout = buffer.layout
    everything = np.arange(layout.num_sequences)
    change = np.zeros((ROLLOUT, 1))
    change[::N_STEPS] = 1.0  # sb3-contrib: a new sequence where an environment's rollout begins
    whole = twin._get_samples(np.arange(ROLLOUT), change)

    def compare(step: int) -> tuple[float, float]:
        ours, our_grads = loss_and_grads(model, buffer.sequences(everything), step)
        theirs, their_grads = loss_and_grads(model, whole, step)
        gap = th.linalg.vector_norm(our_grads - their_grads) / th.linalg.vector_norm(their_grads)
        return abs(ours["loss"] - theirs["loss"]) / abs(theirs["loss"]), float(gap)

    before = compare(0)
    for step in range(8):  # train on our minibatches, then compare again
        members = layout.minibatches(16, model._minibatch_rng)[step % 4]
        loss_and_grads(model, buffer.sequences(members), step)
        model.policy.optimizer.step()
    after = compare(8)
    if sequence_length == N_STEPS:
        assert max(before + after) <= 1e-5, (before, after)
        return
    assert before[0] <= 1e-5 and 1e-3 < before[1] < 0.15, before
    assert 1e-6 < after[0] < 0.02 and 1e-3 < after[1] < 0.15, after


# ----------------------------------------------------------------------------- training
def test_sequence_batching_trains_every_minibatch_in_one_recurrent_call():
    model = recurrent(kl=KL_ON)
    model.set_reference_policy(model.policy)
    calls = []
    lstm = model.policy.lstm_actor
    lstm.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    model.learn(ROLLOUT)
    train_calls = [length for length in calls if length > 1]  # rollout steps are 1 long
    minibatches = model.num_minibatch_steps
    assert minibatches == 2 * int(np.ceil(ROLLOUT / 16))  # as many as sb3-contrib's buffer
    assert len(train_calls) == minibatches and max(train_calls) <= 8
    assert isinstance(model.rollout_buffer, SequenceRolloutBuffer)


def test_sequence_batching_resumes_bit_exactly(tmp_path):
    """A checkpoint after two rollouts (the project's checkpoints: model, optimiser, training
    state with the shuffling generator, environments, RNGs), loaded into a freshly built model
    that trains on: the weights equal an uninterrupted run's exactly."""
    def fresh():
        model = recurrent(kl=KL_ON)
        model.set_reference_policy(distant_reference(TemperatureMlpLstmPolicy))
        return TrainingSession(model=model, venv=model.env)

    whole = fresh()
    whole.model.learn(4 * ROLLOUT)
    manager = CheckpointManager(tmp_path / "checkpoints", max_checkpoints=1)
    first = fresh()
    first.model.learn(2 * ROLLOUT)
    checkpoint = manager.save(first)
    first.model.learn(ROLLOUT, reset_num_timesteps=False)  # moves every generator on
    resumed = fresh()
    manager.load(checkpoint, resumed)
    resumed.model.learn(2 * ROLLOUT, reset_num_timesteps=False)
    a, b = params(whole.model), params(resumed.model)
    assert all(th.equal(a[k], b[k]) for k in a)
    assert whole.model.num_minibatch_steps == resumed.model.num_minibatch_steps == 4 * 8
    state = whole.model.get_training_state()["minibatch_rng_state"]
    assert state == resumed.model.get_training_state()["minibatch_rng_state"]
    with pytest.raises(ValueError, match="minibatch_rng_state"):
        recurrent(sequence_length=None).set_training_state(whole.model.get_training_state())


def test_sequence_length_is_validated():
    with pytest.raises(ValueError, match="sequence_length=0"):
        recurrent(sequence_length=0)
    with pytest.raises(ValueError, match="sequence_length=2.5"):
        recurrent(sequence_length=2.5)


# ----------------------------------------------------------------------------- checkpointing
def _saved_bytes(model) -> list[int]:
    """Bytes of the tensors each minibatch's forward keeps for its backward pass."""
    sizes: list[int] = []
    original = model._forward_minibatch

    def forward(*args, **kwargs):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with th.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = original(*args, **kwargs)
        sizes.append(sum(seen.values()))
        return out

    model._forward_minibatch = forward
    return sizes


@pytest.mark.parametrize("algo", ["recurrent", "feed-forward"])
def test_gradient_checkpointing_keeps_losses_and_gradients_and_saves_memory(algo):
    def run(checkpointing: bool):
        optimization = AdvancedOptimizationConfig(gradient_optimization=GradientOptimizationConfig(
            use_gradient_checkpointing=checkpointing))
        if algo == "recurrent":
            model = recurrent(kl=KL_ON, optimization=optimization)
            model.set_reference_policy(distant_reference(TemperatureMlpLstmPolicy))
        else:
            model = KLPPO("TemperatureMlpPolicy", make_env(), n_steps=N_STEPS, batch_size=16,
                          n_epochs=2, seed=0, device="cpu", policy_kwargs={"net_arch": [8]},
                          kl=KL_ON, optimization=optimization)
            model.set_reference_policy(KLPPO("TemperatureMlpPolicy", make_env(), seed=1,
                                             policy_kwargs={"net_arch": [8]}).policy)
        sizes = _saved_bytes(model)
        model.learn(2 * ROLLOUT)
        return model, sizes

    plain, plain_bytes = run(False)
    checkpointed, checkpointed_bytes = run(True)
    a, b = params(plain), params(checkpointed)
    assert all(th.equal(a[k], b[k]) for k in a)  # the same losses, hence the same updates
    assert plain.logger.name_to_value["train/loss"] == \
        checkpointed.logger.name_to_value["train/loss"]
    assert max(checkpointed_bytes) < 0.5 * min(plain_bytes)
