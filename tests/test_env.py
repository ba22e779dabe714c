"""LLMCluster-v0: spaces, checkers, determinism, reward identity, vector envs, config errors."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import llm_cluster_env
from llm_cluster_env import ConfigError, EnvConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.routing.heuristics import make_router
from llm_cluster_env.sim.metrics import REQUEST_COLUMNS
from llm_cluster_env.tools.evaluation import run_episode
from llm_cluster_env.workload import Workload

SMALL = dict(scenario="a100x4_conv_70", episode_requests=200)


def rollout(env, seed, policy="lor"):
    """Observations, rewards and final info of one episode routed by a heuristic."""
    obs, _ = env.reset(seed=seed)
    router = make_router(policy)
    router.reset(env.unwrapped.num_replicas, np.random.default_rng(seed))
    observations, rewards = [obs], []
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(router.select(env.unwrapped.layout.view(obs)))
        assert not truncated
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards), info


def test_registered_and_spaces():
    env = gym.make(llm_cluster_env.ENV_ID, **SMALL)
    assert env.action_space == gym.spaces.Discrete(4)
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert env.observation_space.contains(obs)
    names = env.unwrapped.layout.names
    assert len(names) == obs.size and len(set(names)) == len(names)
    assert names[:3] == ("r0/queued", "r0/running", "r0/kv_usage")


def test_passes_gymnasium_and_sb3_env_checkers():
    from gymnasium.utils.env_checker import check_env

    check_env(gym.make(llm_cluster_env.ENV_ID, episode_requests=40).unwrapped, skip_render_check=True)
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    sb3_checker.check_env(LLMClusterEnv(episode_requests=40), warn=True)


def test_seeded_runs_are_identical_and_seeds_differ():
    a = rollout(gym.make(llm_cluster_env.ENV_ID, **SMALL), seed=3)
    b = rollout(gym.make(llm_cluster_env.ENV_ID, **SMALL), seed=3)
    c = rollout(gym.make(llm_cluster_env.ENV_ID, **SMALL), seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2]["metrics"] == b[2]["metrics"]
    assert not np.array_equal(a[1], c[1])


def test_episode_return_is_minus_sum_of_latencies():
    env = LLMClusterEnv(**SMALL)
    _, rewards, info = rollout(env, seed=1)
    e2e = [r.finish_time - r.arrival_time for r in env.cluster.requests]
    assert rewards.sum() == pytest.approx(-sum(e2e), rel=1e-9)
    assert info["metrics"]["e2e_mean"] == pytest.approx(np.mean(e2e))
    assert len(rewards) == 200 and info["metrics"]["num_requests"] == 200


def test_final_info_has_per_request_records_summing_to_minus_return():
    env = LLMClusterEnv(**SMALL)
    obs, _ = env.reset(seed=1)
    router = make_router("lor")
    router.reset(env.num_replicas, np.random.default_rng(1))
    rewards, infos, done = [], [], False
    while not done:
        obs, reward, done, _, info = env.step(router.select(env.layout.view(obs)))
        rewards.append(reward)
        infos.append(info)
    assert all(i == {} for i in infos[:-1])  # cheap on non-final steps
    records = infos[-1]["requests"]
    assert tuple(records) == REQUEST_COLUMNS
    assert all(v.shape == (200,) for v in records.values())
    assert np.sum(records["e2e_s"]) == pytest.approx(-np.sum(rewards), rel=1e-9)
    assert np.mean(records["e2e_s"]) == pytest.approx(infos[-1]["metrics"]["e2e_mean"])
    np.testing.assert_array_equal(records["request_id"], np.arange(200))
    requests = env.cluster.requests
    np.testing.assert_array_equal(records["arrival_s"], [r.arrival_time for r in requests])
    np.testing.assert_array_equal(records["replica"], [r.replica_id for r in requests])
    assert records["replica"].dtype == np.int64 and records["e2e_s"].dtype == np.float64
    assert np.all(records["e2e_s"] >= records["ttft_s"])
    assert np.all(records["ttft_s"] >= records["scheduling_delay_s"])
    assert np.all(records["scheduling_delay_s"] >= 0)
    one_token = records["output_tokens"] == 1
    assert np.array_equal(np.isnan(records["tpot_s"]), one_token)
    again = env.request_records()  # the method gives the same records
    assert tuple(again) == REQUEST_COLUMNS
    for name in REQUEST_COLUMNS:
        np.testing.assert_array_equal(again[name], records[name])


def test_reset_serves_a_given_workload_exactly():
    times = np.array([2.5, 2.5, 3.0, 7.25, 7.5])  # starts after 0, with a tie
    work = Workload(times, [100, 2000, 30, 500, 64], [1, 40, 300, 2, 9], num_clipped=1)
    env = LLMClusterEnv(**SMALL)  # episode_requests=200 is ignored
    env.reset(seed=0, options={"workload": work})
    done, steps, actions = False, 0, [3, 1, 1, 0, 2]
    while not done:
        _, _, done, _, info = env.step(actions[steps])
        steps += 1
    assert steps == 5
    records = info["requests"]
    np.testing.assert_array_equal(records["arrival_s"], times)
    np.testing.assert_array_equal(records["prompt_tokens"], work.prompt_tokens)
    np.testing.assert_array_equal(records["output_tokens"], work.output_tokens)
    np.testing.assert_array_equal(records["replica"], actions)
    assert info["metrics"]["num_clipped"] == 1
    with pytest.raises(TypeError, match=r"options\['workload'\]: expected a Workload"):
        env.reset(seed=0, options={"workload": [(0.0, 10, 10)]})


def test_reward_terms_scale_and_penalties():
    env = LLMClusterEnv(**SMALL, reward={"scale": 0.1, "slo_violation_penalty": 2.0,
                                         "imbalance_penalty": 1.0, "ttft_weight": 3.0},
                        slo={"ttft_s": 0.05})
    _, rewards, info = rollout(env, seed=1)
    m = info["metrics"]
    assert rewards.sum() == pytest.approx(m["reward_latency"] + m["reward_ttft"] + m["reward_slo"]
                                          + m["reward_imbalance"], rel=1e-9)
    e2e = sum(r.finish_time - r.arrival_time for r in env.cluster.requests)
    assert m["reward_latency"] == pytest.approx(-0.1 * e2e, rel=1e-9)
    ttft = sum(r.first_token_time - r.arrival_time for r in env.cluster.requests)
    assert m["reward_ttft"] == pytest.approx(-0.1 * 3.0 * ttft, rel=1e-9) and ttft > 0
    tpot_slo = env.config.slo.tpot_s
    violations = sum((r.first_token_time - r.arrival_time) > 0.05 or (
        r.output_tokens > 1
        and (r.finish_time - r.first_token_time) / (r.output_tokens - 1) > tpot_slo)
        for r in env.cluster.requests)
    assert violations > 0
    assert m["reward_slo"] == pytest.approx(-0.1 * 2.0 * violations)
    assert m["reward_imbalance"] < 0


def test_observation_features_match_cluster_state():
    env = LLMClusterEnv(**SMALL, observation={"history_window": 2, "output_length_oracle": True})
    obs, _ = env.reset(seed=5)
    for step in range(60):
        obs, *_ = env.step(step % 4)
    view = env.layout.view(obs)
    for i, rep in enumerate(env.cluster.replicas):
        assert view.queued[i] == len(rep.waiting)
        assert view.running[i] == len(rep.running)
        clock = rep.clock_at(env.cluster.now)
        active = list(rep.waiting) + list(rep.running.values())
        generated = sum((clock - r.decode_offset) if r.state == 3 else r.generated for r in active)
        remaining = sum(r.output_tokens for r in active) - generated
        assert view.replicas[i, 4] == pytest.approx(remaining / 1000, rel=1e-5)
        assert 0.0 <= view.kv_usage[i] <= 1.0
    req = env.pending_request
    assert view.prompt_tokens_k == pytest.approx(req.prompt_tokens / 1000, rel=1e-6)
    names = env.layout.names
    hist = obs[names.index("hist/t-1/r0"): names.index("hist/t-1/r0") + 8].reshape(2, 4)
    np.testing.assert_array_equal(hist, [[0, 0, 0, 1], [0, 0, 1, 0]])  # last: 59 % 4, then 58 % 4
    shares = view.dispatch_share
    assert shares.sum() == pytest.approx(1.0, abs=1e-6)


def test_arrival_rate_feature_tracks_qps():
    env = LLMClusterEnv(**dict(SMALL, episode_requests=3000), observation={
        "arrival_rate_timescale_s": 20.0})
    obs, _ = env.reset(seed=2)
    rates = []
    for step in range(2999):
        obs, *_ = env.step(step % 4)
        if step > 1000:
            rates.append(obs[env.layout.names.index("global/arrival_rate")])
    assert np.mean(rates) == pytest.approx(13.9, rel=0.08)


def test_heuristic_from_observation_equals_heuristic_on_view():
    """A heuristic acting on the flat observation makes the decisions it makes on env.view."""
    env = LLMClusterEnv(**SMALL)
    obs, _ = env.reset(seed=0)
    router = make_router("least_work_time")
    router.reset(4)
    for _ in range(100):
        a = router.select(env.layout.view(obs.copy()))
        assert a == router.select(env.view)
        obs, *_ = env.step(a)


def test_invalid_action_and_step_after_end():
    env = LLMClusterEnv(**dict(SMALL, episode_requests=3))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action=7"):
        env.step(7)
    for _ in range(3):
        _, _, done, _, info = env.step(0)
    assert done and "metrics" in info
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_replicas=0), "num_replicas=0"),
    (dict(workload={"qps": "fast"}), "workload.qps='fast': expected a number"),
    (dict(workload={"arrival": "weibull"}), "workload.arrival='weibull'"),
    (dict(replica={"gpu": "v100"}), "replica.gpu='v100': unknown GPU"),
    (dict(replicas=[{"model": "gpt-5"}]), "replicas[0].model='gpt-5'"),
    (dict(reward={"latency_weightt": 1}), "reward.latency_weightt: unknown key"),
    (dict(scenario="nope"), "scenario='nope': unknown scenario"),
    (dict(scenario="heterogeneous", num_replicas=8), "num_replicas=8: conflicts"),
    (dict(workload={"arrival": "phases"}), "workload.phases=()"),
    (dict(episode_requests=True), "episode_requests=True: expected an integer"),
])
def test_config_errors_name_field_and_value(kwargs, message):
    with pytest.raises(ConfigError) as err:
        LLMClusterEnv(**kwargs)
    assert message in str(err.value)


def test_every_packaged_scenario_runs():
    from llm_cluster_env.scenarios import available_scenarios, scenario_trace_missing

    names = available_scenarios()
    assert {"a100x4_conv_70", "a100x4_conv_90", "bursty", "heterogeneous", "phases",
            "a100x16"} <= set(names)
    for name in names:
        if scenario_trace_missing(name):  # a trace under ../shared/data that is not there
            continue
        env = LLMClusterEnv(scenario=name, episode_requests=100)
        metrics, _ = run_episode(env, make_router("lor"), seed=0)
        assert metrics["num_requests"] == 100
        assert metrics["e2e_mean"] > 0
    het = LLMClusterEnv(scenario="heterogeneous")
    speeds = het.layout.view(het.reset(seed=0)[0]).speed_k
    assert speeds[2] > 1.4 * speeds[0]  # H100 replicas are faster


def test_heterogeneous_routing_matters():
    """Round robin overloads the A100s of the heterogeneous scenario; lor adapts."""
    env = LLMClusterEnv(scenario="heterogeneous", episode_requests=1500)
    rr, _ = run_episode(env, make_router("round_robin"), seed=0)
    lor, _ = run_episode(env, make_router("lor"), seed=0)
    assert rr["e2e_mean"] > 1.3 * lor["e2e_mean"]
    assert lor["dispatch_share_2"] > lor["dispatch_share_0"]


def test_lor_waiting_piles_onto_replica_0_at_moderate_load():
    """Queues stay empty at 3 req/s (15 % load), so lor_waiting's ties all go to replica 0."""
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=400, workload={"qps": 3.0})
    waiting, _ = run_episode(env, make_router("lor_waiting"), seed=0)
    lor, _ = run_episode(env, make_router("lor"), seed=0)
    assert waiting["dispatch_share_0"] > 0.85
    assert waiting["dispatch_share_2"] + waiting["dispatch_share_3"] < 0.05
    assert max(lor[f"dispatch_share_{i}"] for i in range(4)) < 0.35
    assert waiting["e2e_mean"] > 1.3 * lor["e2e_mean"]


def test_routers_are_deterministic_given_seed():
    env = LLMClusterEnv(**SMALL)
    for name in ("random", "power_of_two"):
        a, _ = run_episode(env, make_router(name), seed=9)
        b, _ = run_episode(env, make_router(name), seed=9)
        assert a == b


def test_vector_envs():
    from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv

    def make(seed_offset=0):
        return lambda: gym.make(llm_cluster_env.ENV_ID, episode_requests=20)

    for cls in (SyncVectorEnv, AsyncVectorEnv):
        venv = cls([make(), make()])
        obs, _ = venv.reset(seed=[1, 2])
        assert obs.shape[0] == 2
        saw_metrics = False
        for _ in range(25):
            obs, rew, term, trunc, info = venv.step(np.array([0, 1]))
            if term.any():  # gymnasium 1.x: info itself; 0.29: info["final_info"]
                finals = [f for f in info.get("final_info", []) if f]
                saw_metrics = saw_metrics or "metrics" in info or any(
                    "metrics" in f for f in finals)
        venv.close()
        assert saw_metrics


def test_vector_env_keeps_per_request_records_of_different_lengths():
    # Two episodes of different sizes ending on the same step: gymnasium 1.x would try to stack
    # their record arrays into one (2, n) array if they were plain dicts of arrays.
    from gymnasium.vector import SyncVectorEnv

    next_step_reset = not gym.__version__.startswith("0.")  # 1.x resets on the next step
    lengths = (10, 21 if next_step_reset else 20)
    venv = SyncVectorEnv([lambda n=n: gym.make(llm_cluster_env.ENV_ID, episode_requests=n)
                          for n in lengths])
    venv.reset(seed=[1, 2])
    for _ in range(lengths[1]):
        _, _, term, _, info = venv.step(np.array([0, 1]))
    venv.close()
    assert term.all()
    if next_step_reset:
        records = list(info["requests"])
    else:
        records = [final["requests"] for final in info["final_info"]]
    assert [r.num_requests for r in records] == list(lengths)
    assert all(tuple(r) == REQUEST_COLUMNS for r in records)


@pytest.mark.train
def test_sb3_make_vec_env_and_render_mode():
    env_util = pytest.importorskip("stable_baselines3.common.env_util")
    venv = env_util.make_vec_env(llm_cluster_env.ENV_ID, n_envs=2, seed=0,
                                 env_kwargs={"episode_requests": 10})
    assert venv.reset().shape == (2, venv.observation_space.shape[0])
    with pytest.raises(TypeError, match="render_mode='rgb_array'"):  # make_vec_env retries
        LLMClusterEnv(render_mode="rgb_array")


@pytest.mark.train
@pytest.mark.slow
def test_sb3_subproc_vec_env():
    vec_env = pytest.importorskip("stable_baselines3.common.vec_env")
    venv = vec_env.SubprocVecEnv([lambda: LLMClusterEnv(episode_requests=20)] * 2)
    venv.seed(0)
    venv.reset()
    episode_infos = []
    for _ in range(21):
        _, _, dones, infos = venv.step(np.array([0, 1]))
        episode_infos += [i["metrics"] for i, d in zip(infos, dones) if d]
    venv.close()
    assert len(episode_infos) == 2 and all(m["num_requests"] == 20 for m in episode_infos)


def test_env_works_without_pyyaml():
    code = (
        "import sys; sys.modules['yaml'] = None\n"
        "import gymnasium as gym, llm_cluster_env\n"
        "env = gym.make('LLMCluster-v0', episode_requests=10, workload={'qps': 5.0})\n"
        "env.reset(seed=0); print(env.step(0)[1] <= 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_env_is_picklable_mid_episode():
    import pickle

    env = LLMClusterEnv(**SMALL)
    env.reset(seed=0)
    for i in range(50):
        env.step(i % 4)
    clone = pickle.loads(pickle.dumps(env))
    rewards = [env.step(i % 4)[1] for i in range(50)]
    rewards_clone = [clone.step(i % 4)[1] for i in range(50)]
    assert rewards == rewards_clone


@pytest.mark.shared_data
def test_trace_replay_through_env_matches_trace_rows(vidur_data):
    trace = vidur_data / "processed_traces" / "splitwise_conv.csv"
    env = LLMClusterEnv(episode_requests=300, workload={
        "arrival": "trace", "lengths": "trace", "trace_path": str(trace), "trace_start": 10,
        "oversize_policy": "reject"})
    metrics, _ = run_episode(env, make_router("lor"), seed=0)
    rows = np.genfromtxt(trace, delimiter=",", names=True, max_rows=310)[10:310]
    kept = (rows["num_prefill_tokens"] + rows["num_decode_tokens"]) <= env.cluster.max_request_tokens
    requests = env.cluster.requests
    assert len(requests) == kept.sum() and metrics["num_rejected"] == (~kept).sum()
    np.testing.assert_array_equal([r.prompt_tokens for r in requests],
                                  rows["num_prefill_tokens"][kept])
    times = rows["arrived_at"][kept] - rows["arrived_at"][0]
    np.testing.assert_allclose([r.arrival_time for r in requests], times, atol=1e-9)


def test_oversize_requests_clip_reject_or_fail_naming_the_request(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     "0.0,100,10\n0.5,4000,500\n1.0,50,5\n")
    base = {"arrival": "trace", "lengths": "trace", "trace_path": str(trace), "trace_start": 0}
    clip = LLMClusterEnv(episode_requests=3, workload=base)
    metrics, _ = run_episode(clip, make_router("lor"), seed=0)
    assert metrics["num_clipped"] == 1 and metrics["num_requests"] == 3
    longest = max(r.prompt_tokens + r.output_tokens for r in clip.cluster.requests)
    assert longest <= 4096  # Llama-2's context
    reject = LLMClusterEnv(episode_requests=3, workload={**base, "oversize_policy": "reject"})
    metrics, _ = run_episode(reject, make_router("lor"), seed=0)
    assert metrics["num_rejected"] == 1 and metrics["num_requests"] == 2
    error = LLMClusterEnv(episode_requests=3, workload={**base, "oversize_policy": "error"})
    with pytest.raises(ValueError, match="4000"):
        error.reset(seed=0)


def test_scenario_from_yaml_path_with_overrides(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "mine.yaml"
    path.write_text("description: two H100s\nreplicas:\n  - {gpu: h100}\n  - {gpu: h100}\n"
                    "workload: {qps: 9.0}\n")
    env = LLMClusterEnv(scenario=str(path), workload={"cv": 2.0, "arrival": "gamma"})
    assert env.num_replicas == 2 and env.config.name == "mine"
    assert env.config.workload.qps == 9.0 and env.config.workload.cv == 2.0


def test_env_accepts_a_built_config_and_refuses_extra_settings():
    config = EnvConfig.from_kwargs(scenario="a100x4_conv_70", episode_requests=16)
    built = LLMClusterEnv(config=config)
    from_kwargs = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=16)
    assert built.config == from_kwargs.config
    obs_a, _ = built.reset(seed=3)
    obs_b, _ = from_kwargs.reset(seed=3)
    np.testing.assert_array_equal(obs_a, obs_b)
    with pytest.raises(TypeError, match="episode_requests"):
        LLMClusterEnv(config=config, episode_requests=8)
    with pytest.raises(TypeError, match="EnvConfig"):
        LLMClusterEnv(config={"num_replicas": 2})


@pytest.mark.parametrize("action", [2.7, 2.0, "1", True, np.float32(1.0), np.array([0.5])])
def test_step_refuses_actions_that_are_not_integer_indices(action):
    env = LLMClusterEnv(**SMALL)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="must be an integer replica index"):
        env.step(action)


@pytest.mark.parametrize("action", [1, np.int64(1), np.int32(1), np.array(1), np.array([1])])
def test_step_accepts_python_and_numpy_integers(action):
    env = LLMClusterEnv(**SMALL)
    env.reset(seed=0)
    env.step(action)
    assert env.dispatch_counts == [0, 1, 0, 0]


@pytest.mark.parametrize("replica, message", [
    ({"num_kv_blocks": 64}, "replica.num_kv_blocks=64: the KV cache (64 blocks of 16 tokens"),
    ({"num_kv_blocks": 1}, "replica.num_kv_blocks=1"),
    ({"gpu_memory_utilization": 0.2}, "replica.gpu_memory_utilization=0.2"),
    ({"max_model_len": 8192}, "replica.max_model_len=8192: must be in [16, 4096]"),
    ({"batching": "vllm_v0", "max_num_batched_tokens": 2048},
     "replica.max_num_batched_tokens=2048: is below the 4096-token context"),
])
def test_replica_that_cannot_serve_its_context_window_is_refused(replica, message):
    with pytest.raises(ConfigError) as err:
        LLMClusterEnv(**SMALL, replica=replica)
    assert message in str(err.value)


def test_a_shorter_context_window_makes_a_small_kv_cache_servable():
    env = LLMClusterEnv(**SMALL, replica={"num_kv_blocks": 64, "max_model_len": 1008})
    assert env.cluster.max_request_tokens == 1008
    _, _, info = rollout(env, seed=1)
    assert info["metrics"]["num_requests"] == 200
    assert info["metrics"]["num_clipped"] > 0  # conversation prompts exceed 1,008 tokens


def test_max_total_tokens_over_what_replicas_serve_is_refused():
    with pytest.raises(ConfigError, match="workload.max_total_tokens=100000: exceeds the 4096"):
        LLMClusterEnv(**SMALL, workload={"max_total_tokens": 100000})


def test_very_bursty_arrivals_keep_every_observation_finite():
    env = LLMClusterEnv(scenario="a100x4_conv_70", episode_requests=400,
                        workload={"arrival": "gamma", "cv": 50.0})
    observations, _, info = rollout(env, seed=0)
    assert np.all(np.isfinite(observations))
    rate = observations[:, env.layout.names.index("global/arrival_rate")]
    assert rate.max() > 50.0  # bursts of near-simultaneous arrivals read as a high rate


def test_simulator_imports_only_simulator_modules_at_run_time():
    """Layering: ``sim/`` stands below the config layer (type hints only, under
    TYPE_CHECKING), so there is no import cycle to dodge."""
    import ast
    from pathlib import Path

    sim = Path(llm_cluster_env.__file__).parent / "sim"
    offending = []
    for path in sorted(sim.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level, so `if TYPE_CHECKING:` blocks are skipped
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = node.names[0].name
            else:
                continue
            allowed = ("llm_cluster_env.sim", "llm_cluster_env.hardware", "llm_cluster_env.prefix_chain")
            if module.startswith("llm_cluster_env") and not module.startswith(allowed):
                offending.append(f"{path.name}: {module}")
    assert offending == []
