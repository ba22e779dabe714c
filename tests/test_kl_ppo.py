"""KL terms, temperature-aware policies and the KL-regularised PPO / RecurrentPPO loop."""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import numpy as np
import pytest

th = pytest.importorskip("torch")
pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
from sb3_contrib import RecurrentPPO  # noqa: E402
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy  # noqa: E402
from sb3_contrib.common.recurrent.type_aliases import RNNStates  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.policies import ActorCriticPolicy  # noqa: E402
from stable_baselines3.common.utils import LinearSchedule  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

import llm_cluster_env  # noqa: E402,F401
from sb3_warmstart.algorithms.kl import (  # noqa: E402
    PPOLossTerms,
    approx_kl,
    categorical_kl,
    instant_kl_penalty,
    ppo_loss_terms,
)
from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO, RefLogitsRecurrentRolloutBuffer  # noqa: E402
from sb3_warmstart.pipeline.config import (  # noqa: E402
    AdaptiveBatchSizeConfig,
    AdvancedOptimizationConfig,
    GradientOptimizationConfig,
    KLConfig,
    LearningRateScheduleConfig,
)
from sb3_warmstart.policies.recurrent import (  # noqa: E402
    TemperatureMlpLstmPolicy,
    TemperatureMlpPolicy,
    action_log_probs,
)

pytestmark = pytest.mark.train

N_STEPS, N_ENVS = 32, 2
ROLLOUT = N_STEPS * N_ENVS
LSTM_KW = dict(lstm_hidden_size=8, net_arch=[8])
MLP_KW = dict(net_arch=[8])


def make_env(episode_requests: int = 64) -> DummyVecEnv:
    return DummyVecEnv([partial(gym.make, "LLMCluster-v0", episode_requests=episode_requests)]
                       * N_ENVS)


KL_FIELDS = set(KLConfig.__dataclass_fields__)


def config_kwargs(kw: dict) -> dict:
    """Flat test settings -> the algorithm's ``kl``/``optimization`` configs (knobs not given
    are off: ``KLConfig.disabled()``, SB3's own optimisation)."""
    kw = dict(kw)
    kl = {k: kw.pop(k) for k in list(kw) if k in KL_FIELDS}
    if kl:
        kw["kl"] = dataclasses.replace(KLConfig.disabled(), **kl)
    optimization = {}
    if "lr_schedule_config" in kw:
        optimization["learning_rate_schedule"] = kw.pop("lr_schedule_config")
    if "gradient_accumulation_steps" in kw:
        optimization["gradient_optimization"] = GradientOptimizationConfig(
            accumulation_steps=kw.pop("gradient_accumulation_steps"))
    if "min_batch_size" in kw:
        optimization["adaptive_batch_size"] = AdaptiveBatchSizeConfig(
            enable=True, min_batch_size=kw.pop("min_batch_size"),
            max_batch_size=kw.pop("max_batch_size"),
            adaptation_rate=kw.pop("batch_size_adaptation_rate", 0.1))
    if optimization:
        kw["optimization"] = AdvancedOptimizationConfig(**optimization)
    return kw


def recurrent(policy=TemperatureMlpLstmPolicy, algo=KLRecurrentPPO, episode_requests=64, **kw):
    args = dict(n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=0, policy_kwargs=LSTM_KW)
    args.update(config_kwargs(kw))
    return algo(policy, make_env(episode_requests), **args)


def feedforward(policy=TemperatureMlpPolicy, algo=KLPPO, **kw):
    args = dict(n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=0, policy_kwargs=MLP_KW)
    args.update(config_kwargs(kw))
    return algo(policy, make_env(), **args)


def params(model) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert th.equal(a[key], b[key]), key


def logged(model) -> dict[str, float]:
    return dict(model.logger.name_to_value)


def peaked_policy(model, bias=(3.0, 0.0, 0.0, 0.0)):
    """A copy of the model's policy whose action head strongly prefers replica 0."""
    import copy

    policy = copy.deepcopy(model.policy)
    with th.no_grad():
        policy.action_net.bias.copy_(th.tensor(bias))
    return policy


# ---------------------------------------------------------------------------- KL math
def test_categorical_kl_matches_torch_and_respects_mask(rng):
    logits = th.tensor(rng.normal(size=(6, 4)) * 2, dtype=th.float32)
    ref = th.tensor(rng.normal(size=(6, 4)), dtype=th.float32)
    expected = th.distributions.kl_divergence(th.distributions.Categorical(logits=logits),
                                              th.distributions.Categorical(logits=ref))
    assert categorical_kl(logits, ref).item() == pytest.approx(expected.mean().item(), rel=1e-6)
    mask = th.tensor([True, False, True, True, False, False])
    assert categorical_kl(logits, ref, mask).item() == pytest.approx(
        expected[mask].mean().item(), rel=1e-6)
    # hand computation on one row: p = (0.5, 0.5), q = (0.25, 0.75)
    p, q = th.log(th.tensor([[0.5, 0.5]])), th.log(th.tensor([[0.25, 0.75]]))
    hand = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert categorical_kl(p, q).item() == pytest.approx(hand, rel=1e-6)
    assert categorical_kl(ref, ref + 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    with pytest.raises(ValueError, match="shape"):
        categorical_kl(logits, ref[:, :3])


def test_categorical_kl_gradient_flows_to_policy_only():
    logits = th.zeros(3, 4, requires_grad=True)
    ref = th.tensor([[2.0, 0.0, 0.0, 0.0]] * 3)
    categorical_kl(logits, ref).backward()
    assert logits.grad is not None and logits.grad[:, 0].lt(0).all()  # raising p(0) lowers KL


def test_instant_kl_penalty_is_mean_then_clamp():
    old = th.tensor([-1.0, -1.0, -1.0, -5.0])
    new = th.tensor([-2.0, -0.5, -1.0, -0.0])
    # per-entry old - new = [1, -0.5, 0, -5]: mean -1.125 -> clamped to 0 (clamp-then-mean = 0.25)
    assert instant_kl_penalty(old, new, 0.7).item() == 0.0
    mask = th.tensor([True, True, True, False])
    # valid entries [1, -0.5, 0]: mean 1/6, times 0.7
    assert instant_kl_penalty(old, new, 0.7, mask).item() == pytest.approx(0.7 / 6, rel=1e-6)


def test_approx_kl_is_sb3_estimator():
    old = th.tensor([-1.0, -2.0, -0.5])
    new = th.tensor([-1.2, -1.0, -0.5])
    r = new - old
    hand = float(((th.exp(r) - 1) - r).mean())
    assert approx_kl(old, new).item() == pytest.approx(hand, rel=1e-7)
    mask = th.tensor([False, True, True])
    assert approx_kl(old, new, mask).item() == pytest.approx(
        float(((th.exp(r[1:]) - 1) - r[1:]).mean()), rel=1e-7)


def _loss_inputs(rng, n=12, n_actions=4):
    g = th.Generator().manual_seed(int(rng.integers(1 << 30)))
    return dict(
        log_prob=th.randn(n, generator=g) - 1.5,
        old_log_prob=th.randn(n, generator=g) - 1.5,
        advantages=th.randn(n, generator=g) * 3,
        values_pred=th.randn(n, generator=g),
        returns=th.randn(n, generator=g),
        entropy=th.rand(n, generator=g) + 0.5,
    ), th.randn(n, n_actions, generator=g), th.randn(n, n_actions, generator=g)


def test_loss_without_extras_is_the_stock_formula_exactly(rng):
    inputs, _, _ = _loss_inputs(rng)
    terms = ppo_loss_terms(**inputs, clip_range=0.2, ent_coef=0.01, vf_coef=0.5)
    adv = inputs["advantages"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = th.exp(inputs["log_prob"] - inputs["old_log_prob"])
    policy_loss = -th.min(adv * ratio, adv * th.clamp(ratio, 0.8, 1.2)).mean()
    value_loss = th.nn.functional.mse_loss(inputs["returns"], inputs["values_pred"])
    entropy_loss = -th.mean(inputs["entropy"])
    stock = policy_loss + 0.01 * entropy_loss + 0.5 * value_loss
    assert th.equal(terms.total, stock)
    assert terms.kl_ref.item() == terms.kl_instant.item() == terms.entropy_floor_penalty.item() == 0
    assert set(terms.to_floats()) == {
        "policy_gradient_loss", "value_loss", "entropy_loss", "entropy", "entropy_coef", "kl_ref",
        "kl_ref_coef", "kl_instant", "entropy_floor_penalty", "approx_kl", "clip_fraction",
        "loss"}


def test_loss_adds_each_enabled_term(rng):
    inputs, logits, ref = _loss_inputs(rng)
    mask = th.tensor([True] * 9 + [False] * 3)
    base = ppo_loss_terms(**inputs, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, mask=mask)
    full = ppo_loss_terms(**inputs, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, mask=mask,
                          logits=logits, ref_logits=ref, kl_ref_coef=0.3, kl_coef=2.0,
                          entropy_min=5.0, entropy_floor_coef=0.1)
    kl_ref = categorical_kl(logits, ref, mask)
    kl_instant = 2.0 * (inputs["old_log_prob"] - inputs["log_prob"])[mask].mean().clamp(min=0)
    floor = 0.1 * (5.0 - inputs["entropy"][mask].mean())
    assert full.kl_ref.item() == pytest.approx(kl_ref.item())
    assert full.kl_instant.item() == pytest.approx(kl_instant.item())
    assert full.entropy_floor_penalty.item() == pytest.approx(floor.item())
    assert full.total.item() == pytest.approx(
        base.total.item() + 0.3 * kl_ref.item() + kl_instant.item() + floor.item(), rel=1e-6)
    # reference present but coefficient 0: KL is reported, not added
    monitored = ppo_loss_terms(**inputs, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, mask=mask,
                               logits=logits, ref_logits=ref)
    assert th.equal(monitored.total, base.total) and monitored.kl_ref.item() > 0
    with pytest.raises(ValueError, match="kl_ref_coef"):
        ppo_loss_terms(**inputs, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, kl_ref_coef=0.1)
    with pytest.raises(Exception):  # frozen dataclass  # noqa: B017
        full.total = th.zeros(())  # type: ignore[misc]
    assert isinstance(full, PPOLossTerms)


# ---------------------------------------------------------------------------- policies
def _policy_pair(stock_cls, temp_cls, **kw):
    env = gym.make("LLMCluster-v0", episode_requests=16)
    spaces_ = (env.observation_space, env.action_space, lambda _: 3e-4)
    th.manual_seed(7)
    stock = stock_cls(*spaces_, **kw)
    th.manual_seed(7)
    tempered = temp_cls(*spaces_, **kw)
    obs = th.as_tensor(np.stack([env.reset(seed=s)[0] for s in range(5)]))
    return stock, tempered, obs


@pytest.mark.parametrize("recurrent_policy", [False, True])
def test_temperature_one_is_bitwise_the_parent(recurrent_policy):
    stock_cls, temp_cls, kw = ((RecurrentActorCriticPolicy, TemperatureMlpLstmPolicy, LSTM_KW)
                               if recurrent_policy else (ActorCriticPolicy, TemperatureMlpPolicy,
                                                         MLP_KW))
    stock, tempered, obs = _policy_pair(stock_cls, temp_cls, **kw)
    sd_stock, sd_temp = stock.state_dict(), tempered.state_dict()
    assert list(sd_stock) == list(sd_temp)
    assert all(th.equal(sd_stock[k], sd_temp[k]) for k in sd_stock)
    # checkpoints load both ways
    tempered.load_state_dict(stock.state_dict())
    stock.load_state_dict(tempered.state_dict())
    if recurrent_policy:
        zeros = th.zeros(1, 5, 8)
        state = RNNStates((zeros, zeros), (zeros, zeros))
        starts = th.zeros(5)
        th.manual_seed(1)
        a1, v1, lp1, _ = stock(obs, state, starts)
        th.manual_seed(1)
        a2, v2, lp2, _ = tempered(obs, state, starts)
        e1 = stock.evaluate_actions(obs, a1, state, starts)
        e2 = tempered.evaluate_actions(obs, a1, state, starts)
    else:
        th.manual_seed(1)
        a1, v1, lp1 = stock(obs)
        th.manual_seed(1)
        a2, v2, lp2 = tempered(obs)
        e1, e2 = stock.evaluate_actions(obs, a1), tempered.evaluate_actions(obs, a1)
    assert th.equal(a1, a2) and th.equal(v1, v2) and th.equal(lp1, lp2)
    assert all(th.equal(x, y) for x, y in zip(e1, e2))


def test_temperature_scales_logits_and_sampling_entropy():
    _, policy, obs = _policy_pair(ActorCriticPolicy, TemperatureMlpPolicy, **MLP_KW)
    with th.no_grad():
        policy.action_net.bias.copy_(th.tensor([2.0, 1.0, 0.0, -1.0]))
    raw = policy.action_net(policy.mlp_extractor.forward_actor(policy.extract_features(obs)))
    entropies = []
    for temperature in (0.5, 1.0, 2.0, 4.0):
        policy.temperature = temperature
        log_probs, _ = action_log_probs(policy, obs)
        expected = th.log_softmax(raw / temperature, dim=-1)
        assert th.allclose(log_probs, expected, atol=1e-6)
        # rollout log-probs and evaluate_actions agree, so PPO's ratio is 1 on fresh data
        actions, _, lp_rollout = policy(obs)
        _, lp_eval, entropy = policy.evaluate_actions(obs, actions)
        assert th.allclose(lp_rollout, lp_eval)
        entropies.append(entropy.mean().item())
        # empirical sampling frequencies follow softmax(logits / T)
        one = obs[:1].repeat(20000, 1)
        with th.no_grad():
            samples = policy.get_distribution(one).get_actions()
        freq = th.bincount(samples, minlength=4).double() / len(samples)
        assert th.allclose(freq, expected[0].exp().double(), atol=0.015)
    assert entropies == sorted(entropies)  # hotter -> more entropy
    assert entropies[-1] < math.log(4) and entropies[0] > 0
    with pytest.raises(ValueError, match="temperature=0"):
        policy.temperature = 0.0
        policy(obs)


def test_uniform_actions_act_like_a_random_router():
    _, policy, obs = _policy_pair(RecurrentActorCriticPolicy, TemperatureMlpLstmPolicy, **LSTM_KW)
    with th.no_grad():
        policy.action_net.bias.copy_(th.tensor([5.0, 0.0, 0.0, 0.0]))
    policy.uniform_actions = True
    zeros = th.zeros(1, 4000, 8)
    state = RNNStates((zeros, zeros), (zeros, zeros))
    many = obs[:1].repeat(4000, 1)
    with th.no_grad():
        actions, _, log_prob, _ = policy(many, state, th.zeros(4000))
    assert th.allclose(log_prob, th.full_like(log_prob, -math.log(4)))
    freq = th.bincount(actions, minlength=4).double() / 4000
    assert th.allclose(freq, th.full((4,), 0.25, dtype=th.float64), atol=0.03)
    _, lp_eval, entropy = policy.evaluate_actions(many[:10], actions[:10], RNNStates(
        (zeros[:, :10], zeros[:, :10]), (zeros[:, :10], zeros[:, :10])), th.zeros(10))
    assert th.allclose(lp_eval, th.full((10,), -math.log(4)))
    assert th.allclose(entropy, th.full((10,), math.log(4)))


# ---------------------------------------------------------------------------- bit-for-bit
@pytest.mark.parametrize("policy", ["MlpLstmPolicy", TemperatureMlpLstmPolicy])
def test_kl_recurrent_ppo_is_bitwise_recurrent_ppo(policy):
    stock = recurrent("MlpLstmPolicy", RecurrentPPO)
    initial = params(stock)
    stock.learn(2 * ROLLOUT)
    ours = recurrent(policy, KLRecurrentPPO).learn(2 * ROLLOUT)
    assert ours.num_minibatch_steps == 2 * 2 * (ROLLOUT // 16)
    assert not th.equal(initial["action_net.weight"], params(stock)["action_net.weight"])
    assert_same_params(params(stock), params(ours))
    stock_opt, our_opt = stock.policy.optimizer.state_dict(), ours.policy.optimizer.state_dict()
    assert all(th.equal(stock_opt["state"][i]["exp_avg"], our_opt["state"][i]["exp_avg"])
               for i in stock_opt["state"])


def test_kl_ppo_is_bitwise_ppo():
    stock = feedforward("MlpPolicy", PPO)
    initial = params(stock)
    stock.learn(2 * ROLLOUT)
    ours = feedforward(TemperatureMlpPolicy, KLPPO).learn(2 * ROLLOUT)
    assert not th.equal(initial["action_net.weight"], params(stock)["action_net.weight"])
    assert_same_params(params(stock), params(ours))


# ---------------------------------------------------------------------------- reference
def _rollout_recorder(model):
    """Wrap ``_prepare_reference`` to keep each rollout's obs, starts and reference logits."""
    records = []
    original = model._prepare_reference

    def prepare():
        original()
        buf = model.rollout_buffer
        records.append((buf.observations.copy(), buf.episode_starts.copy(),
                        buf.ref_logits.copy()))

    model._prepare_reference = prepare
    return records


def test_stored_reference_logits_equal_stepping_the_reference():
    model = recurrent(episode_requests=20)  # episodes end inside and across rollouts
    reference = recurrent(seed=1, episode_requests=20).policy  # different weights
    model.set_reference_policy(reference)
    records = _rollout_recorder(model)
    model.learn(3 * ROLLOUT)
    assert len(records) == 3
    obs = np.concatenate([r[0] for r in records])  # (3 * n_steps, n_envs, dim)
    starts = np.concatenate([r[1] for r in records])
    stored = np.concatenate([r[2] for r in records])
    assert starts[1:].sum() >= 3  # episode boundaries inside the rollouts
    frozen = model.reference_policy
    for env in range(N_ENVS):
        state = (th.zeros(1, 1, 8), th.zeros(1, 1, 8))
        for t in range(len(obs)):
            with th.no_grad():
                log_probs, state = action_log_probs(
                    frozen, th.as_tensor(obs[t, env][None]), state,
                    th.as_tensor(starts[t, env][None], dtype=th.float32))
            np.testing.assert_allclose(stored[t, env], log_probs[0].numpy(), atol=2e-6)
        # the carried state is the reference's state after the last step of that env
        assert th.allclose(model._reference_lstm_states[0][:, env], state[0][:, 0], atol=2e-6)
    # the frozen copy is the given policy's weights, not trained, not in the optimiser
    ref_ids = {id(p) for p in frozen.parameters()}
    opt_ids = {id(p) for g in model.policy.optimizer.param_groups for p in g["params"]}
    assert not ref_ids & opt_ids and not any(p.requires_grad for p in frozen.parameters())
    assert all(th.equal(a, b) for a, b in zip(frozen.state_dict().values(),
                                              reference.state_dict().values()))


def test_minibatch_reference_logits_follow_their_entries():
    model = recurrent(episode_requests=20)
    model.set_reference_policy(peaked_policy(model))
    model.updates_deferred = True
    model.learn(ROLLOUT)  # fills the buffer and the reference logits, no update
    buf = model.rollout_buffer
    assert isinstance(buf, RefLogitsRecurrentRolloutBuffer)
    flat_ref = buf.swap_and_flatten(buf.ref_logits.copy())
    flat_obs = buf.swap_and_flatten(buf.observations.copy())
    seen = 0
    for data in buf.get(12):
        mask = data.mask > 0
        assert data.ref_logits.shape == (len(mask), 4)
        for obs_row, ref_row in zip(data.observations[mask], data.ref_logits[mask]):
            (index,) = np.nonzero((flat_obs == obs_row.numpy()).all(axis=1))
            np.testing.assert_array_equal(flat_ref[index[0]], ref_row.numpy())
            seen += 1
        assert (data.ref_logits[~mask] == 0).all()
    assert seen == ROLLOUT


@pytest.mark.slow
def test_reference_kl_pulls_the_policy_towards_the_reference():
    def run(coef):
        model = recurrent(learning_rate=3e-3, kl_ref_coef_initial=coef, kl_ref_coef_final=coef,
                          n_epochs=4)
        model.set_reference_policy(peaked_policy(model, bias=(4.0, 0.0, 0.0, 0.0)))
        kls = []
        for _ in range(4):
            model.learn(ROLLOUT, reset_num_timesteps=False)
            kls.append(logged(model)["train/kl_ref"])
        return kls

    pulled, free = run(5.0), run(0.0)
    assert pulled[0] > 1.0 and free[0] > 1.0  # both start far from the reference
    assert pulled[-1] < 0.5 * pulled[0]
    assert pulled[-1] < 0.5 * free[-1]


def test_kl_decay_by_minibatch_step_and_resume(tmp_path):
    model = recurrent(kl_ref_coef_initial=1.0, kl_ref_coef_final=0.2, kl_ref_decay_steps=12)
    assert [model.kl_ref_coef_at(t) for t in (0, 3, 6, 12, 50)] == pytest.approx(
        [1.0, 0.8, 0.6, 0.2, 0.2])
    model.set_reference_policy(peaked_policy(model))
    model.learn(ROLLOUT)  # 8 minibatch steps: coefficients at steps 0..7
    assert model.num_minibatch_steps == 8
    expected = np.mean([1.0 - 0.8 * t / 12 for t in range(8)])
    assert logged(model)["train/kl_ref_coef"] == pytest.approx(expected)
    assert model.kl_ref_coef_at() == pytest.approx(1.0 - 0.8 * 8 / 12)

    # simulated resume into a fresh model
    state = model.get_training_state()
    fresh = recurrent(kl_ref_coef_initial=1.0, kl_ref_coef_final=0.2, kl_ref_decay_steps=12)
    fresh.set_parameters(model.get_parameters())
    fresh.set_training_state(state)
    assert fresh.num_minibatch_steps == 8
    assert fresh.kl_ref_coef_at() == model.kl_ref_coef_at()
    assert all(th.equal(a, b) for a, b in zip(fresh.reference_policy.state_dict().values(),
                                              model.reference_policy.state_dict().values()))
    assert all(th.equal(a, b) for a, b in zip(fresh._reference_lstm_states,
                                              model._reference_lstm_states))
    fresh.learn(ROLLOUT, reset_num_timesteps=False)  # steps 8..15, clamped from 12 on
    expected = np.mean([1.0 - 0.8 * t / 12 if t < 12 else 0.2 for t in range(8, 16)])
    assert logged(fresh)["train/kl_ref_coef"] == pytest.approx(expected)

    # SB3 save/load round trip carries the same state
    model.save(tmp_path / "model.zip")
    loaded = KLRecurrentPPO.load(tmp_path / "model.zip", env=make_env())
    assert loaded.num_minibatch_steps == 8 and loaded.kl.kl_ref_coef_initial == 1.0
    assert_same_params(params(model), params(loaded))
    for key, value in model.get_training_state().items():
        other = loaded.get_training_state()[key]
        if key == "reference_policy_state_dict":
            assert all(th.equal(value[k], other[k]) for k in value)
        elif key == "reference_lstm_states":
            assert all(th.equal(a, b) for a, b in zip(value, other))
        else:
            assert value == other, key
    with pytest.raises(ValueError, match="missing keys"):
        fresh.set_training_state({"num_minibatch_steps": 3})


def test_entropy_warmup_switches_at_the_right_step():
    model = recurrent(ent_coef=0.01, entropy_warmup_coef=0.5, warmup_steps=6)
    assert [model.entropy_coef_at(t) for t in (0, 5, 6, 7)] == [0.5, 0.5, 0.01, 0.01]
    model.learn(ROLLOUT)  # steps 0..7: six at 0.5, two at 0.01
    assert logged(model)["train/entropy_coef"] == pytest.approx((6 * 0.5 + 2 * 0.01) / 8)
    model.learn(ROLLOUT, reset_num_timesteps=False)
    assert logged(model)["train/entropy_coef"] == pytest.approx(0.01)


def test_entropy_floor_raises_entropy():
    def run(floor_coef):
        model = feedforward(learning_rate=3e-3, entropy_min=1.386, entropy_floor_coef=floor_coef,
                            kl_coef=0.0, n_epochs=4)
        with th.no_grad():
            model.policy.action_net.bias.copy_(th.tensor([3.0, 0.0, 0.0, 0.0]))
        model.learn(2 * ROLLOUT)
        return logged(model)

    floored, free = run(10.0), run(0.0)
    assert floored["train/entropy_floor_penalty"] > 0 and free["train/entropy_floor_penalty"] == 0
    assert floored["train/entropy"] > free["train/entropy"] + 0.05


# ---------------------------------------------------------------------------- optimisation
def test_grad_clipping_holds_with_accumulation():
    model = feedforward(gradient_accumulation_steps=3, max_grad_norm=0.05, batch_size=8)
    applied = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        applied.append(th.linalg.vector_norm(th.stack([th.linalg.vector_norm(g) for g in grads])))

    model.policy.optimizer.register_step_pre_hook(record)
    model.learn(ROLLOUT)
    # 8 minibatches per epoch -> groups of 3, 3, 2 -> 3 optimiser steps per epoch, 2 epochs
    assert model.num_minibatch_steps == len(applied) == 6
    assert max(float(n) for n in applied) <= 0.05 + 1e-6
    assert logged(model)["train/grad_norm"] > 0.05  # pre-clip norms were larger


def test_accumulated_gradient_is_the_mean_of_minibatch_gradients():
    """With accumulation over the whole buffer in one epoch, the step's gradient is the mean
    of the per-minibatch gradients (checked against a manual computation)."""
    model = feedforward(gradient_accumulation_steps=4, batch_size=16, n_epochs=1,
                        max_grad_norm=1e9)
    captured = []
    model.policy.optimizer.register_step_pre_hook(lambda opt, a, k: captured.append(
        [p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    per_batch = []
    original = model._evaluate_minibatch

    def evaluate(rollout_data, actions):
        out = original(rollout_data, actions)
        per_batch.append((rollout_data, actions))
        return out

    model._evaluate_minibatch = evaluate
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(ROLLOUT)
    assert len(captured) == 1 and len(per_batch) == 4
    # recompute each minibatch's gradient at the pre-step weights
    model.policy.load_state_dict(before)
    grads = []
    for data, actions in per_batch:
        model.policy.zero_grad()
        values, log_prob, entropy = model.policy.evaluate_actions(data.observations, actions)
        terms = ppo_loss_terms(log_prob=log_prob, old_log_prob=data.old_log_prob,
                               advantages=data.advantages, values_pred=values.flatten(),
                               returns=data.returns, entropy=entropy, clip_range=0.2,
                               ent_coef=0.0, vf_coef=0.5)
        terms.total.backward()
        grads.append([p.grad.clone() for p in model.policy.parameters()])
    for i, grad in enumerate(captured[0]):
        mean = sum(g[i] for g in grads) / 4
        assert th.allclose(grad, mean, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_adaptive_batch_size_rule_and_bounds():
    model = recurrent(min_batch_size=8, max_batch_size=32, batch_size=16,
                      batch_size_adaptation_rate=0.5)
    assert model.current_batch_size == 16
    model._adapt_batch_size(2.0)  # first norm: becomes the reference, no change
    assert model.current_batch_size == 16 and model._grad_norm_reference == 2.0
    model._adapt_batch_size(8.0)  # 4x the reference -> 16 * (1/4)^0.5 = 8
    assert model.current_batch_size == 8
    assert model._grad_norm_reference == pytest.approx(5.0)
    model._adapt_batch_size(100.0)  # far larger: clipped at the lower bound
    assert model.current_batch_size == 8
    model._grad_norm_reference = 4.0
    model._adapt_batch_size(1.0)  # smaller norm -> 8 * 4^0.5 = 16
    assert model.current_batch_size == 16
    for _ in range(10):
        model._adapt_batch_size(1e-3)
    assert model.current_batch_size == 32  # clipped at the upper bound
    sizes = []
    trained = recurrent(min_batch_size=8, max_batch_size=32, batch_size=16,
                        batch_size_adaptation_rate=0.5)
    for _ in range(3):
        trained.learn(ROLLOUT, reset_num_timesteps=False)
        sizes.append(logged(trained)["train/batch_size"])
    assert sizes[0] == 16 and all(8 <= s <= 32 for s in sizes)
    state = trained.get_training_state()
    assert state["batch_size"] is not None and state["grad_norm_reference"] is not None
    with pytest.raises(ValueError, match="batch_size=64"):
        recurrent(min_batch_size=8, max_batch_size=32, batch_size=64)
    with pytest.raises(ValueError, match="min_batch_size=300"):
        AdaptiveBatchSizeConfig(enable=True, min_batch_size=300)


@pytest.mark.parametrize("enabled", [False, True])
def test_early_stop_only_when_enabled(enabled):
    model = feedforward(target_kl=1e-9, target_kl_early_stop=enabled, learning_rate=1e-2,
                        n_epochs=3)
    model.learn(ROLLOUT)
    log = logged(model)
    assert log["train/target_kl_exceeded"] == 1.0
    assert log["train/early_stop"] == float(enabled)
    full = 3 * ROLLOUT // 16
    assert (model.num_minibatch_steps < full) if enabled else (model.num_minibatch_steps == full)


def test_lr_scheduler_drives_the_optimizer_per_step():
    cfg = LearningRateScheduleConfig(type="cosine_annealing_with_warmup", warmup_steps=4,
                                     restart_period=6, min_lr_ratio=0.1)
    model = feedforward(learning_rate=1e-3, lr_schedule_config=cfg)
    used = []
    model.policy.optimizer.register_step_pre_hook(
        lambda opt, a, k: used.append(opt.param_groups[0]["lr"]))
    model.learn(2 * ROLLOUT)  # 16 optimiser steps
    expected = [1e-3 * (1e-3 + (1 - 1e-3) * t / 4) for t in range(4)] + [
        1e-4 + 9e-4 * (1 + math.cos(math.pi * ((t - 4) % 6) / 6)) / 2 for t in range(4, 16)]
    assert used == pytest.approx(expected, rel=1e-9)
    assert logged(model)["train/learning_rate"] == pytest.approx(expected[-1])
    # resume: the next LRs continue exactly
    state = model.get_training_state()
    fresh = feedforward(learning_rate=1e-3, lr_schedule_config=cfg)
    fresh.set_parameters(model.get_parameters())
    fresh.set_training_state(state)
    nxt = []
    fresh.policy.optimizer.register_step_pre_hook(
        lambda opt, a, k: nxt.append(opt.param_groups[0]["lr"]))
    fresh.learn(ROLLOUT)
    assert nxt == pytest.approx([1e-4 + 9e-4 * (1 + math.cos(math.pi * ((t - 4) % 6) / 6)) / 2
                                 for t in range(16, 24)], rel=1e-9)


def test_updates_deferred_skips_gradient_steps_but_logs():
    model = recurrent()
    model.set_reference_policy(peaked_policy(model))
    before = params(model)
    model.updates_deferred = True
    model.learn(2 * ROLLOUT)
    assert_same_params(before, params(model))
    assert model.num_minibatch_steps == 0
    assert logged(model)["train/updates_deferred"] == 1.0
    assert model._reference_lstm_states[0].abs().sum() > 0  # the reference carry still moved
    model.updates_deferred = False
    model.learn(ROLLOUT, reset_num_timesteps=False)
    assert logged(model)["train/updates_deferred"] == 0.0 and model.num_minibatch_steps == 8


@pytest.mark.slow
def test_schedule_total_timesteps_makes_chunks_equal_one_run():
    schedule = LinearSchedule(1e-3, 1e-5, 1.0)

    def run(chunks, total):
        model = feedforward(learning_rate=schedule, clip_range=LinearSchedule(0.3, 0.1, 1.0),
                            schedule_total_timesteps=total)
        progress = []
        for i in range(chunks):
            model.learn(4 * ROLLOUT // chunks, reset_num_timesteps=i == 0)
            progress.append(model._current_progress_remaining)
        return params(model), progress

    whole, p_whole = run(1, None)
    chunked, p_chunked = run(2, 4 * ROLLOUT)
    assert p_chunked[-1] == p_whole[-1] == 0.0 and p_chunked[0] == 0.5
    assert_same_params(whole, chunked)
    naive, _ = run(2, None)  # each chunk restarts the schedules
    assert not th.equal(naive["action_net.weight"], whole["action_net.weight"])


def test_constructor_errors_name_the_field():
    with pytest.raises(ValueError, match="kl_ref_coef_initial=-1"):
        feedforward(kl_ref_coef_initial=-1)
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        feedforward(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="schedule_total_timesteps=0"):
        feedforward(schedule_total_timesteps=0)
    model = feedforward()
    with pytest.raises(ValueError, match="feed-forward"):
        model.set_reference_policy(recurrent().policy)
    with pytest.raises(ValueError, match="RecurrentActorCriticPolicy"):
        recurrent().set_reference_policy(model.policy)


# ---------------------------------------------------------------------------- flat keywords
FLAT = dict(kl_ref_coef_initial=0.4, kl_ref_coef_final=0.1, kl_ref_decay_steps=6, kl_coef=0.3,
            entropy_warmup_coef=0.05, warmup_steps=3, entropy_min=0.9, entropy_floor_coef=0.2)


def _flat(policy=TemperatureMlpPolicy, algo=KLPPO, **kw):
    """The algorithm built with KL settings as flat keywords (not through ``config_kwargs``)."""
    args = dict(n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=0,
                policy_kwargs=LSTM_KW if algo is KLRecurrentPPO else MLP_KW)
    return algo(policy, make_env(), **{**args, **kw})


def test_kl_keywords_are_the_config_fields():
    from sb3_warmstart.algorithms.ppo import KL_KEYWORDS

    assert set(KL_KEYWORDS) == KL_FIELDS and set(FLAT) < KL_FIELDS


@pytest.mark.parametrize("algo, policy", [(KLPPO, TemperatureMlpPolicy),
                                          (KLRecurrentPPO, TemperatureMlpLstmPolicy)])
def test_flat_kl_keywords_train_exactly_like_the_config(algo, policy):
    """``KLPPO(..., kl_coef=...)`` is ``KLPPO(..., kl=replace(KLConfig.disabled(), ...))``."""
    reference = _flat(policy, algo).policy
    trained = []
    for kw in (FLAT, {"kl": dataclasses.replace(KLConfig.disabled(), **FLAT)}):
        model = _flat(policy, algo, **kw)  # seeds the global generators: build, then learn
        model.set_reference_policy(reference)
        trained.append(model.learn(2 * ROLLOUT))
    flat, typed = trained
    assert flat.kl == typed.kl and flat.kl.kl_coef == 0.3 and flat.kl.target_kl_early_stop
    assert_same_params(params(flat), params(typed))
    assert logged(flat)["train/kl_ref_coef"] == logged(typed)["train/kl_ref_coef"] > 0


def test_flat_kl_keywords_survive_save_and_load(tmp_path):
    model = _flat(**FLAT)
    model.save(tmp_path / "model.zip")
    assert KLPPO.load(tmp_path / "model.zip").kl == model.kl


def test_flat_kl_keywords_and_a_config_are_refused_together():
    with pytest.raises(TypeError, match="kl=KLConfig.*kl_coef, warmup_steps: give the KL "
                                        "settings one way"):
        _flat(kl=KLConfig(), kl_coef=0.1, warmup_steps=2)


@pytest.mark.parametrize("name, value", [("kl_coef", -0.5), ("warmup_steps", 1.5),
                                         ("kl_ref_coef_final", float("nan"))])
def test_bad_flat_kl_keyword_names_the_field_and_value(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        _flat(**{name: value})


# ---------------------------------------------------------------------------- init_policy
def _cloned_policy_file(tmp_path, normalized: bool, net_arch=(8,)):
    """A policy file as the BC stage writes it: a perturbed policy, the env's schema and, when
    ``normalized``, observation statistics."""
    from stable_baselines3.common.running_mean_std import RunningMeanStd

    from sb3_warmstart.policies.policy_file import save_pretrained

    env = make_env()
    source = KLPPO(TemperatureMlpPolicy, env, n_steps=N_STEPS, seed=1,
                   policy_kwargs={"net_arch": list(net_arch)})
    with th.no_grad():
        for p in source.policy.parameters():
            p.add_(0.5)
    obs_rms = None
    if normalized:
        obs_rms = RunningMeanStd(shape=env.observation_space.shape)
        obs_rms.mean[:] = np.arange(env.observation_space.shape[0], dtype=np.float64)
        obs_rms.var[:] = 4.0
        obs_rms.count = 100.0
    schema = env.envs[0].unwrapped.layout.schema()
    path = save_pretrained(tmp_path / "bc.zip", source.policy, {"bc_metrics": {}}, obs_rms,
                           observation_schema=schema)
    return path, params(source), obs_rms


def _normalized_env():
    from stable_baselines3.common.vec_env import VecNormalize

    return VecNormalize(make_env(), gamma=0.99)


def test_init_policy_loads_weights_statistics_and_reference(tmp_path):
    path, weights, obs_rms = _cloned_policy_file(tmp_path, normalized=True)
    venv = _normalized_env()
    model = KLPPO(TemperatureMlpPolicy, venv, n_steps=N_STEPS, batch_size=16, n_epochs=1,
                  seed=0, policy_kwargs=MLP_KW, init_policy=str(path), kl_ref_coef_initial=0.5,
                  kl_ref_coef_final=0.5)
    assert_same_params(params(model), weights)
    assert_same_params({k: v for k, v in model.reference_policy.state_dict().items()}, weights)
    np.testing.assert_array_equal(venv.obs_rms.mean, obs_rms.mean)
    np.testing.assert_array_equal(venv.obs_rms.var, obs_rms.var)
    model.learn(ROLLOUT)
    assert logged(model)["train/kl_ref"] > 0.0  # the learner moved away from the reference
    assert not th.equal(params(model)["action_net.weight"], weights["action_net.weight"])


def test_init_policy_without_reference_kl_sets_no_reference(tmp_path):
    path, weights, _ = _cloned_policy_file(tmp_path, normalized=False)
    model = _flat(init_policy=path, kl_coef=0.1)
    assert_same_params(params(model), weights)
    assert model.reference_policy is None


def test_init_policy_mismatches_name_the_file(tmp_path):
    from sb3_warmstart.policies.policy_file import PretrainedMismatchError

    normalized, _, _ = _cloned_policy_file(tmp_path / "a", normalized=True)
    with pytest.raises(ValueError, match=r"init_policy=.*bc.zip.*cloned on normalised "
                                         r"observations but the env does not normalise"):
        _flat(init_policy=normalized)
    raw, _, _ = _cloned_policy_file(tmp_path / "b", normalized=False)
    with pytest.raises(ValueError, match="cloned on raw observations but the env normalises"):
        KLPPO(TemperatureMlpPolicy, _normalized_env(), policy_kwargs=MLP_KW, init_policy=raw)
    with pytest.raises(ValueError, match=r"init_policy=.*bc.zip.*architecture differs"):
        _flat(init_policy=raw, policy_kwargs={"net_arch": [16]})
    with pytest.raises(ValueError, match="holds a TemperatureMlpPolicy, this model's policy is "
                                         "ActorCriticPolicy"):
        _flat("MlpPolicy", init_policy=raw)
    other = DummyVecEnv([partial(gym.make, "LLMCluster-v0", num_replicas=3)])
    with pytest.raises(PretrainedMismatchError, match="action count"):
        KLPPO(TemperatureMlpPolicy, other, policy_kwargs=MLP_KW, init_policy=raw)
