"""Critic warm-up: value-only updates that leave the actor exactly where it is.

A warm-started critic was fitted to the demonstrations' rewards; under a paired reward PPO
trains on other rewards. ``stabilization.critic_warmup_steps`` lets the critic alone learn the
new values (``KLPPO.critic_only_updates``, driven by the ``CriticWarmup`` callback) before the
first policy update.
"""

from __future__ import annotations

from functools import partial

import pytest

th = pytest.importorskip("torch")
pytest.importorskip("sb3_contrib")

import gymnasium as gym  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback, CallbackList  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

import llm_cluster_env  # noqa: E402,F401
from llm_cluster_env.validation import ConfigError  # noqa: E402
from sb3_warmstart.algorithms.callbacks import CriticWarmup  # noqa: E402
from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO  # noqa: E402
from sb3_warmstart.pipeline.config import KLConfig, PPOConfig, TrainingConfig  # noqa: E402
from sb3_warmstart.policies.parameters import critic_only_parameters  # noqa: E402
from sb3_warmstart.policies.recurrent import TemperatureMlpLstmPolicy, TemperatureMlpPolicy  # noqa: E402
from sb3_warmstart.policies.replica_set import ReplicaSetPolicy  # noqa: E402

pytestmark = pytest.mark.train

N_STEPS, N_ENVS = 32, 2
ROLLOUT = N_STEPS * N_ENVS


def make_env() -> DummyVecEnv:
    return DummyVecEnv([partial(gym.make, "LLMCluster-v0", episode_requests=64)] * N_ENVS)


def replica_set_model(**kw) -> KLPPO:
    venv = make_env()
    layout = venv.envs[0].unwrapped.layout
    policy_kwargs = PPOConfig(set_embed_dim=8, set_hidden_dim=8).policy_kwargs(layout)
    return KLPPO(ReplicaSetPolicy, venv, n_steps=N_STEPS, batch_size=16, n_epochs=2, seed=0,
                 policy_kwargs=policy_kwargs, **kw)


def split_params(model) -> tuple[dict[str, th.Tensor], dict[str, th.Tensor]]:
    """(actor-reachable parameters, critic-only parameters), cloned, by name."""
    critic = {id(p) for p in critic_only_parameters(model.policy)}
    actor, value = {}, {}
    for name, p in model.policy.named_parameters():
        (value if id(p) in critic else actor)[name] = p.detach().clone()
    return actor, value


def test_critic_only_parameters_of_the_replica_set_policy_are_its_value_head():
    model = replica_set_model()
    names = {n for n, p in model.policy.named_parameters()
             if any(p is c for c in critic_only_parameters(model.policy))}
    assert names and all(n.startswith("mlp_extractor.value.") for n in names)
    assert names == {n for n, _ in model.policy.named_parameters()
                     if n.startswith("mlp_extractor.value.")}
    # changing them changes the value and never the action distribution
    obs = th.as_tensor(model.env.reset(), dtype=th.float32)
    with th.no_grad():
        logits = model.policy.get_distribution(obs).distribution.logits.clone()
        value = model.policy.predict_values(obs).clone()
        for p in critic_only_parameters(model.policy):
            p.add_(0.5)
        assert th.equal(model.policy.get_distribution(obs).distribution.logits, logits)
        assert not th.equal(model.policy.predict_values(obs), value)


@pytest.mark.parametrize("build", [
    replica_set_model,
    lambda **kw: KLPPO(TemperatureMlpPolicy, make_env(), n_steps=N_STEPS, batch_size=16,
                       n_epochs=2, seed=0, policy_kwargs=dict(net_arch=[8]), **kw),
    lambda **kw: KLRecurrentPPO(TemperatureMlpLstmPolicy, make_env(), n_steps=N_STEPS,
                                batch_size=16, n_epochs=2, seed=0,
                                policy_kwargs=dict(lstm_hidden_size=8, net_arch=[8]), **kw),
], ids=["replica_set", "mlp", "lstm"])
def test_critic_only_updates_fit_the_critic_and_leave_the_actor(build):
    model = build(kl=KLConfig(kl_ref_coef_initial=1.0, kl_ref_coef_final=0.1,
                              kl_ref_decay_steps=100))
    model.set_reference_policy(model.policy)
    actor, value = split_params(model)
    model.critic_only_updates = True
    model.learn(2 * ROLLOUT)
    actor_after, value_after = split_params(model)
    for name in actor:  # bit for bit, the shared features extractor included
        assert th.equal(actor[name], actor_after[name]), name
    assert any(not th.equal(value[n], value_after[n]) for n in value)
    assert model.num_minibatch_steps == 0  # KL decay, entropy warm-up, LR schedule not started
    logs = dict(model.logger.name_to_value)
    assert logs["train/critic_only"] == 1.0 and logs["train/value_loss"] >= 0
    # then a normal update moves the actor and starts the schedules
    model.critic_only_updates = False
    model.learn(ROLLOUT, reset_num_timesteps=False)
    moved, _ = split_params(model)
    assert any(not th.equal(actor[n], moved[n]) for n in actor)
    assert model.num_minibatch_steps == 2 * ROLLOUT // 16
    assert dict(model.logger.name_to_value)["train/critic_only"] == 0.0


def test_critic_only_updates_lower_the_value_error_on_a_fixed_rollout():
    model = replica_set_model(learning_rate=1e-2)
    model.learn(ROLLOUT)  # fills the rollout buffer

    def value_error() -> float:
        buffer = model.rollout_buffer
        obs = th.as_tensor(buffer.observations.reshape(ROLLOUT, -1))
        with th.no_grad():
            values = model.policy.predict_values(obs).flatten()
        returns = th.as_tensor(buffer.returns.reshape(-1))
        return float(((returns - values) ** 2).mean())

    before = value_error()
    for _ in range(10):
        model._train_critic_only()
    after = value_error()
    assert after < 0.5 * before


class FlagProbe(BaseCallback):
    """``critic_only_updates`` at the end of every rollout (what the next ``train()`` sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[bool] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.flags.append(bool(self.model.critic_only_updates))


def test_critic_warmup_callback_covers_whole_rollouts_after_stabilisation():
    model = replica_set_model()
    probe = FlagProbe()
    warmup = CriticWarmup(ROLLOUT, ROLLOUT + 10)  # [64, 138): rollouts starting at 64 and 128
    model.learn(5 * ROLLOUT, callback=CallbackList([warmup, probe]))
    assert probe.flags == [False, True, True, False, False]
    assert model.num_minibatch_steps == 3 * 2 * ROLLOUT // 16
    assert model.critic_only_updates is False  # reset when learn() returns
    # resumed past the window: stateless, nothing to do
    probe.flags.clear()
    model.learn(ROLLOUT, reset_num_timesteps=False, callback=CallbackList([warmup, probe]))
    assert probe.flags == [False]


def test_critic_warmup_needs_a_supporting_algorithm_and_valid_lengths():
    stock = PPO("MlpPolicy", make_env(), n_steps=N_STEPS, device="cpu")
    with pytest.raises(TypeError, match="critic_only_updates"):
        stock.learn(N_STEPS, callback=CriticWarmup(0, N_STEPS))
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        CriticWarmup(0, -1)
    # a policy whose value head shares every weight with the actor is refused before training
    no_critic = replica_set_model()
    before = {k: v.clone() for k, v in no_critic.policy.state_dict().items()}
    no_critic.policy.mlp_extractor.value.requires_grad_(False)
    with th.no_grad():  # hide the head from named_parameters: re-register its weights as buffers
        for name, p in list(no_critic.policy.mlp_extractor.value.named_parameters()):
            module_name, attr = name.rsplit(".", 1)
            module = no_critic.policy.mlp_extractor.value.get_submodule(module_name)
            delattr(module, attr)
            module.register_buffer(attr, p.detach())
    with pytest.raises(ValueError, match="critic_warmup_steps=64: ReplicaSetPolicy has no "
                                         "critic-only parameters"):
        no_critic.learn(ROLLOUT, callback=CriticWarmup(0, ROLLOUT))
    assert no_critic.num_timesteps == 0
    assert all(th.equal(before[k], v) for k, v in no_critic.policy.state_dict().items())
    with pytest.raises(ConfigError, match="critic_warmup_steps=-5"):
        TrainingConfig().with_overrides({"stabilization": {"critic_warmup_steps": -5}})


def test_critic_warmup_at_zero_keeps_the_training_identity_of_earlier_runs():
    base = TrainingConfig()
    assert "critic_warmup_steps" not in base.training_identity()["stabilization"]
    warm = base.with_overrides({"stabilization": {"critic_warmup_steps": 4096}})
    assert warm.training_identity()["stabilization"]["critic_warmup_steps"] == 4096


def test_bc_clips_sb3_critic_modules_apart_but_keeps_the_replica_set_head_in_the_joint_clip():
    from sb3_warmstart.warmstart.bc import separately_clipped_critic

    replica_set = replica_set_model().policy
    assert separately_clipped_critic(replica_set) == []
    mlp = KLPPO(TemperatureMlpPolicy, make_env(), n_steps=N_STEPS,
                policy_kwargs=dict(net_arch=[8])).policy
    assert separately_clipped_critic(mlp) == critic_only_parameters(mlp) != []
