"""Heuristic demonstrations: state parity, router agreement, step shares, determinism, imbalance
segments, imitation's on-disk format, atomic replacement, validation and the CLI."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import llm_cluster_env
from llm_cluster_env.config import EnvConfig
from llm_cluster_env.routing.heuristics import ROUTERS, make_router
from llm_cluster_env.sim.metrics import balance_score

pytestmark = pytest.mark.train

imitation = pytest.importorskip("imitation")
from imitation.data import serialize  # noqa: E402
from imitation.data.types import TrajectoryWithRew  # noqa: E402

from sb3_warmstart.warmstart import demo_collect, demo_store  # noqa: E402
from sb3_warmstart.warmstart.demo_collect import (  # noqa: E402
    HeuristicPolicy,
    collect_demonstrations,
)
from sb3_warmstart.warmstart.demo_plan import ImbalanceSpec, plan_collection  # noqa: E402
from sb3_warmstart.warmstart.demo_store import (  # noqa: E402
    DemonstrationMismatchError,
    check_demonstrations_match_env,
    load_demonstrations,
    save_demonstrations,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_QPS = 13.9  # a100x4_conv_70
SMALL = {"scenario": "a100x4_conv_70", "episode_requests": 64}
SMALL_CONFIG = EnvConfig.from_kwargs(**SMALL)


def _collect(**overrides):
    kwargs = dict(env_config=SMALL_CONFIG, policies={"lor": 1.0}, total_steps=128, seed=3,
                  imbalance=False)
    kwargs.update(overrides)
    return collect_demonstrations(**kwargs)


@pytest.fixture(scope="module")
def mixed():
    """lor/round_robin/random at 0.6/0.3/0.1 over 640 steps of 64-request episodes."""
    return collect_demonstrations(imbalance=False, env_config=SMALL_CONFIG, total_steps=640,
                                  seed=11,
                                  policies={"lor": 0.6, "round_robin": 0.3, "random": 0.1})


def _same_trajectories(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.obs, y.obs) and x.obs.dtype == y.obs.dtype
        and np.array_equal(x.acts, y.acts) and np.array_equal(x.rews, y.rews)
        and x.terminal == y.terminal for x, y in zip(a, b))


def _make_env(env_kwargs):
    return gym.make(llm_cluster_env.ENV_ID, **env_kwargs)


# ------------------------------------------------------------------------------- policy
def test_heuristic_policy_resets_routers_at_episode_starts():
    env = _make_env(SMALL)
    layout = env.unwrapped.layout
    obs, _ = env.reset(seed=0)
    batch = np.stack([obs, obs])
    policy = HeuristicPolicy("round_robin", layout, 2, seed=0)
    acts, state = policy(batch, None, np.zeros(2, dtype=bool))  # state None: all start
    assert acts.tolist() == [0, 0]
    acts, state = policy(batch, state, np.zeros(2, dtype=bool))
    assert acts.tolist() == [1, 1]
    acts, state = policy(batch, state, np.array([False, True]))  # env 1 starts an episode
    assert acts.tolist() == [2, 0]
    assert policy.episodes_started.tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"observations.shape=\(3, "):
        policy(np.stack([obs] * 3), state, np.zeros(3, dtype=bool))


@pytest.mark.parametrize("name", [n for n in ROUTERS
                                  if not make_router(n).requires_context])
def test_heuristic_policy_matches_router_on_the_env_observation(name):
    """Any router name works, and deciding from layout.view(obs) equals the router on the env's
    own view (state-builder parity)."""
    env = _make_env(SMALL).unwrapped
    obs, _ = env.reset(seed=5)
    policy = HeuristicPolicy(name, env.layout, 1, seed=7)
    reference = make_router(name)
    reference.reset(env.num_replicas, np.random.default_rng(
        np.random.SeedSequence(7).spawn(1)[0].spawn(1)[0]))
    state = None
    for _ in range(40):
        act, state = policy(obs[None], state, np.zeros(1, dtype=bool))
        assert int(act[0]) == reference.select(env.view)
        obs, *_ = env.step(int(act[0]))


# --------------------------------------------------------------------------- collection
def test_observations_are_exactly_what_the_env_returns():
    """Replaying each demo's actions in a fresh env reset with its episode seed reproduces the
    observations bit for bit, the rewards exactly and the final metrics."""
    trajs, stats = _collect(policies={"lor": 1.0, "random": 1.0}, total_steps=256,
                            imbalance=True)
    assert stats["trajectory_segments"].count("imbalance") == 2
    for traj, policy, segment, seed in zip(trajs, stats["trajectory_policies"],
                                           stats["trajectory_segments"], stats["episode_seeds"]):
        assert isinstance(traj, TrajectoryWithRew) and traj.terminal
        run = next(r for r in stats["runs"] if (r["policy"], r["segment"]) == (policy, segment))
        env = _make_env(run["env_kwargs"])
        obs, _ = env.reset(seed=seed)
        replay, rews, info = [obs], [], {}
        for act in traj.acts:
            obs, rew, terminated, _, info = env.step(int(act))
            replay.append(obs)
            rews.append(rew)
        assert terminated
        replay = np.stack(replay)
        assert traj.obs.dtype == replay.dtype == np.float32
        assert np.array_equal(traj.obs, replay)
        assert np.array_equal(traj.rews, np.asarray(rews, dtype=np.float64))
        assert traj.infos[-1]["metrics"] == pytest.approx(info["metrics"], nan_ok=True)
        assert traj.infos[-1]["episode_seed"] == seed
        assert all(i == {} for i in traj.infos[:-1])


def test_lor_actions_are_lor_choices_on_every_transition(mixed):
    """Every recorded lor action is one of lor's tied best replicas (ties are broken at random
    from the episode's router generator, so not always the lowest)."""
    trajs, stats = mixed
    layout = _make_env(SMALL).unwrapped.layout
    router = make_router("lor")
    checked = not_lowest = 0
    for traj, policy in zip(trajs, stats["trajectory_policies"]):
        if policy != "lor":
            continue
        for obs, act in zip(traj.obs[:-1], traj.acts):
            ties = router.tied_choices(layout.view(obs))
            assert int(act) in ties
            not_lowest += int(act) != ties[0]
            checked += 1
    assert checked == stats["policies"]["lor"]["steps"] > 0
    assert not_lowest > 0


def test_mixed_step_shares_follow_the_weights_and_stats_are_right(mixed):
    trajs, stats = mixed
    episode = stats["episode_requests"]
    assert episode == 64
    total = sum(len(t.acts) for t in trajs)
    assert stats["total_steps"] == total >= stats["total_steps_requested"] == 640
    assert stats["total_episodes"] == len(trajs) == len(stats["trajectory_policies"])
    assert [r["steps_requested"] for r in stats["runs"]] == [384, 192, 64]
    for name, weight in {"lor": 0.6, "round_robin": 0.3, "random": 0.1}.items():
        mine = [t for t, p in zip(trajs, stats["trajectory_policies"]) if p == name]
        p = stats["policies"][name]
        steps = sum(len(t.acts) for t in mine)
        assert p["steps"] == steps and p["episodes"] == len(mine)
        assert p["steps_requested"] <= steps < p["steps_requested"] + episode
        assert abs(steps - weight * total) <= episode
        assert p["share"] == pytest.approx(steps / total)
        counts = np.bincount(np.concatenate([t.acts for t in mine]), minlength=4)
        assert p["action_counts"] == counts.tolist()
        assert p["action_distribution"] == pytest.approx(counts / steps)
        assert p["balance"] == pytest.approx(balance_score(counts))
        assert p["mean_return"] == pytest.approx(np.mean([t.rews.sum() for t in mine]))
        assert p["mean_e2e_s"] == pytest.approx(
            np.mean([t.infos[-1]["metrics"]["e2e_mean"] for t in mine]))
        # return = -sum of E2E latencies (default reward), per episode
        assert p["mean_return"] == pytest.approx(-p["mean_e2e_s"] * episode, rel=1e-6)
    # round robin restarts at replica 0 each 64-request episode: 16 per replica
    assert stats["policies"]["round_robin"]["action_counts"] == [48, 48, 48, 48]
    assert stats["schema"] == _make_env(SMALL).unwrapped.layout.schema()
    assert EnvConfig.from_kwargs(**stats["env_kwargs"]) == SMALL_CONFIG  # a complete record
    assert stats["seed"] == 11
    assert set(stats["versions"]) >= {"imitation", "stable_baselines3", "gymnasium"}
    json.dumps(stats)  # JSON-able


def test_same_seed_gives_identical_trajectories_and_other_seeds_differ():
    a, sa = _collect(num_envs=2, total_steps=192)
    b, sb = _collect(num_envs=2, total_steps=192)
    c, _ = _collect(num_envs=2, total_steps=192, seed=4)
    assert _same_trajectories(a, b)
    drop = ("timing", "versions")
    assert {k: v for k, v in sa.items() if k not in drop} == \
        {k: v for k, v in sb.items() if k not in drop}
    assert not np.array_equal(a[0].obs, c[0].obs)
    # episodes have distinct seeds; extra episodes finished by the 2nd env are dropped
    assert len(set(sa["episode_seeds"])) == len(a) == 3
    assert sa["runs"][0]["episodes_collected"] == 4 and sa["total_steps"] == 192


def test_a_policys_data_does_not_depend_on_the_other_policies():
    alone, _ = _collect(policies={"random": 1.0})
    mixed, stats = _collect(policies={"lor": 1.0, "random": 1.0}, total_steps=256)
    mine = [t for t, p in zip(mixed, stats["trajectory_policies"]) if p == "random"]
    assert _same_trajectories(alone, mine)
    lor = [t for t, p in zip(mixed, stats["trajectory_policies"]) if p == "lor"]
    assert not np.array_equal(lor[0].obs[0], mine[0].obs[0])  # distinct workloads


def test_imbalance_segments_alternate_high_and_low_rates():
    spec = ImbalanceSpec(high_factor=1.4, low_factor=0.5, fraction=1.0, cycles_per_episode=1.0)
    env_kwargs = {"scenario": "a100x4_conv_70", "episode_requests": 256}
    trajs, stats = collect_demonstrations(env_config=EnvConfig.from_kwargs(**env_kwargs),
                                          policies={"lor": 1.0},
                                          total_steps=512, seed=2, imbalance=spec)
    assert [r["segment"] for r in stats["runs"]] == ["imbalance"]
    workload = stats["runs"][0]["env_kwargs"]["workload"]
    high, low = workload["phases"]
    assert workload["arrival"] == "phases"
    assert high["qps"] == pytest.approx(1.4 * SCENARIO_QPS)
    assert low["qps"] == pytest.approx(0.5 * SCENARIO_QPS)
    duration = 256 / (1.0 * (high["qps"] + low["qps"]))
    assert high["duration_s"] == low["duration_s"] == pytest.approx(duration)
    assert stats["imbalance"]["fraction"] == 1.0
    # measured arrival rates of the replayed episodes, pooled over both episodes
    counts, spans = np.zeros(2), np.zeros(2)
    for seed in stats["episode_seeds"]:
        env = _make_env(stats["runs"][0]["env_kwargs"]).unwrapped
        env.reset(seed=seed)
        arrivals = np.array([r.arrival_time for r in env.cluster.requests])
        end = arrivals[-1]
        phase = (arrivals // duration).astype(int) % 2
        counts += np.bincount(phase, minlength=2)
        full = int(end // (2 * duration))
        rest = end - full * 2 * duration
        spans += full * duration + np.array([min(rest, duration), max(rest - duration, 0.0)])
    rates = counts / spans
    assert rates[0] == pytest.approx(high["qps"], rel=0.2)
    assert rates[1] == pytest.approx(low["qps"], rel=0.35)  # this draw: -24 %
    assert rates[0] / rates[1] > 2.0  # true ratio 2.8
    # the observation's arrival-rate feature follows: higher at the end of the high phase
    layout = _make_env(env_kwargs).unwrapped.layout
    rate_index = layout.names.index("global/arrival_rate")
    assert trajs[0].obs[:, rate_index].max() > 1.2 * SCENARIO_QPS


def test_imbalance_default_splits_each_policy_between_base_and_imbalance():
    plan = plan_collection(env_config=SMALL_CONFIG, policies={"lor": 3, "random": 1},
                           total_steps=1024, imbalance=True)
    assert [(r.policy, r.segment, r.steps) for r in plan.runs] == [
        ("lor", "base", 384), ("lor", "imbalance", 384),
        ("random", "base", 128), ("random", "imbalance", 128)]
    assert plan.runs[0].env_config is SMALL_CONFIG
    assert plan.runs[1].env_config.workload.arrival == "phases"
    assert plan.runs[1].env_config.workload.phases[0].qps == pytest.approx(1.4 * SCENARIO_QPS)
    phases_plan = plan_collection(env_config=EnvConfig.from_kwargs(scenario="phases",
                                                                   episode_requests=64),
                                  policies={"lor": 1}, total_steps=128, imbalance=True)
    mean_qps = (21.9 + 8.0) / 2  # time-weighted mean of the scenario's equal-length phases
    assert phases_plan.runs[1].env_config.workload.phases[0].qps == \
        pytest.approx(1.4 * mean_qps)


def test_plan_validates_arguments_and_keeps_the_configs_episode_length():
    with pytest.raises(ValueError, match="router='nope'"):
        plan_collection(imbalance=False, env_config=SMALL_CONFIG, policies={"nope": 1.0},
                        total_steps=64)
    with pytest.raises(ValueError, match=r"policies\['lor'\]=0"):
        plan_collection(imbalance=False, env_config=SMALL_CONFIG, policies={"lor": 0},
                        total_steps=64)
    with pytest.raises(ValueError, match="total_steps=0"):
        plan_collection(imbalance=False, env_config=SMALL_CONFIG, policies={"lor": 1.0},
                        total_steps=0)
    with pytest.raises(ValueError, match="episode_requests=64: exceeds the 50 steps"):
        plan_collection(imbalance=False, env_config=SMALL_CONFIG,
                        policies={"lor": 1, "random": 1}, total_steps=100)
    with pytest.raises(ValueError, match="env_config: expected an EnvConfig, got dict"):
        plan_collection(imbalance=False, env_config=SMALL, policies={"lor": 1}, total_steps=64)
    with pytest.raises(ValueError, match="imbalance.fraction=0"):
        ImbalanceSpec(fraction=0)
    plan = plan_collection(imbalance=False, env_config=SMALL_CONFIG,
                           policies={"lor": 3, "random": 1}, total_steps=400)
    assert plan.episode_requests == 64 and plan.env_config is SMALL_CONFIG
    assert [(r.policy, r.steps) for r in plan.runs] == [("lor", 300), ("random", 100)]
    with pytest.raises(ValueError, match="seed=-1"):
        collect_demonstrations(imbalance=False, env_config=SMALL_CONFIG, policies={"lor": 1},
                               total_steps=64, seed=-1)


# ------------------------------------------------------------------------------ storage
def test_save_load_round_trip_with_imitations_own_loader(tmp_path, mixed):
    trajs, stats = mixed
    path = save_demonstrations(tmp_path / "demos", trajs, stats)
    assert (path / "stats.json").is_file()
    loaded = serialize.load_with_rewards(path)  # imitation reads the directory directly
    assert len(loaded) == len(trajs)
    for a, b in zip(trajs, loaded):
        assert isinstance(b, TrajectoryWithRew)
        assert np.array_equal(a.obs, b.obs) and np.array_equal(a.acts, b.acts)
        assert np.array_equal(a.rews, b.rews)
        assert b.infos[-1] == a.infos[-1]
    ours, ours_stats = load_demonstrations(path)
    assert _same_trajectories(trajs, ours)  # float32 observations, bit for bit
    assert ours_stats == json.loads(json.dumps(stats))


def test_saved_set_is_readable_by_others_under_the_umask(tmp_path, mixed):
    trajs, stats = mixed
    old = os.umask(0o022)
    try:
        path = save_demonstrations(tmp_path / "demos", trajs, stats)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # not tempfile's 0700
    assert stat.S_IMODE((path / "stats.json").stat().st_mode) == 0o644


def test_failed_write_keeps_the_previous_set(tmp_path, monkeypatch, mixed):
    trajs, stats = mixed
    path = tmp_path / "demos"
    save_demonstrations(path, trajs[:2], {**stats, "total_episodes": 2,
                                          "total_steps": sum(len(t.acts) for t in trajs[:2]),
                                          "trajectory_policies": stats["trajectory_policies"][:2]})

    def crash(p, _trajectories):
        Path(p, "data-00000-of-00001.arrow").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(serialize, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_demonstrations(path, trajs, stats)
    monkeypatch.undo()
    with pytest.raises(TypeError):  # stats not JSON-able: fails before touching anything
        save_demonstrations(path, trajs, {**stats, "bad": object()})
    old, old_stats = load_demonstrations(path)
    assert len(old) == old_stats["total_episodes"] == 2
    assert _same_trajectories(old, trajs[:2])
    assert sorted(os.listdir(tmp_path)) == ["demos"]  # no temporary directory left over
    # a successful write then replaces it
    save_demonstrations(path, trajs, stats)
    assert len(load_demonstrations(path)[0]) == len(trajs)
    assert sorted(os.listdir(tmp_path)) == ["demos"]


def test_replacement_without_atomic_exchange_and_refusals(tmp_path, monkeypatch, mixed):
    trajs, stats = mixed
    path = tmp_path / "demos"
    save_demonstrations(path, trajs, stats)
    monkeypatch.setattr(demo_store, "_rename_exchange", lambda a, b: False)
    small = {**stats, "total_episodes": 1, "total_steps": len(trajs[0].acts),
             "trajectory_policies": stats["trajectory_policies"][:1]}
    save_demonstrations(path, trajs[:1], small)
    assert len(load_demonstrations(path)[0]) == 1
    assert sorted(os.listdir(tmp_path)) == ["demos"]
    # crash on the second rename of the fallback (new set into place): the old set comes back
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("crash between renames")
        real_rename(src, dst)

    monkeypatch.setattr(demo_store.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="crash between renames"):
        save_demonstrations(path, trajs, stats)
    monkeypatch.setattr(demo_store.os, "rename", real_rename)
    assert len(calls) == 3  # old aside, new in (fails), old back
    assert len(load_demonstrations(path)[0]) == 1
    assert sorted(os.listdir(tmp_path)) == ["demos"]
    other = tmp_path / "project"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a demonstration set"):
        save_demonstrations(other, trajs, stats)
    assert (other / "keep.txt").read_text() == "x"


def test_load_errors_are_clear(tmp_path, mixed):
    trajs, stats = mixed
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_demonstrations(tmp_path / "missing")
    path = save_demonstrations(tmp_path / "demos", trajs, stats)
    (path / "stats.json").rename(tmp_path / "stats.json")
    with pytest.raises(FileNotFoundError, match="missing stats.json"):
        load_demonstrations(path)
    (path / "stats.json").write_text('{"format": "sb3_warm')
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_demonstrations(path)
    (tmp_path / "stats.json").rename(path / "stats.json")
    for arrow in path.glob("*.arrow"):
        arrow.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="corrupt trajectory dataset"):
        load_demonstrations(path)
    path = save_demonstrations(tmp_path / "demos2", trajs, {**stats, "total_episodes": 99})
    with pytest.raises(ValueError, match="total_episodes=99"):
        load_demonstrations(path)


def test_schema_mismatch_names_the_field(mixed):
    _, stats = mixed
    check_demonstrations_match_env(stats, _make_env(SMALL))  # same layout: no error
    venv = demo_collect.make_demo_venv(SMALL_CONFIG, [np.random.SeedSequence(0)])
    check_demonstrations_match_env(stats, venv)  # an SB3 VecEnv works too
    with pytest.raises(DemonstrationMismatchError, match="num_replicas: 4 in the demo"):
        check_demonstrations_match_env(stats, demo_collect.make_demo_venv(
            EnvConfig.from_kwargs(**{**SMALL, "num_replicas": 2}),
            [np.random.SeedSequence(0)]))
    with pytest.raises(DemonstrationMismatchError) as err:
        check_demonstrations_match_env(stats, _make_env({**SMALL, "num_replicas": 3}))
    message = str(err.value)
    assert "num_replicas: 4 in the demonstrations vs 3 in the env" in message
    assert "feature_names: length 46 in the demonstrations vs 35 in the env" in message
    assert "first difference at [33]: 'r3/queued' vs 'req/prompt_tokens_k'" in message
    with pytest.raises(DemonstrationMismatchError, match="history_window: 0 in the demo"):
        check_demonstrations_match_env(
            stats, _make_env({**SMALL, "observation": {"history_window": 2}}))


# ---------------------------------------------------------------------------------- CLI
def _cli():
    sys.path.insert(0, str(REPO_ROOT / "train"))
    try:
        import collect_demos
    finally:
        sys.path.remove(str(REPO_ROOT / "train"))
    return collect_demos


@pytest.mark.parametrize(("argv", "expected"), [
    (["--policy", "fastest"], "warm_start.demo_policies='fastest': unknown router"),
    (["--policies", "lor:0.6,magic:0.4"], "warm_start.demo_policies='magic': unknown router"),
    (["--policies", "lor:0.6,random:0"], "warm_start.demo_policies.random=0.0: weight must be > 0"),
    (["--policies", "lor:-1"], "warm_start.demo_policies.lor=-1.0: weight must be > 0"),
    (["--policies", "lor:x"], "weight of 'lor' must be a number, got 'x'"),
    (["--policies", "lor"], "entry 'lor' must be NAME:WEIGHT"),
    (["--policies", "lor:1,lor:2"], "router 'lor' given twice"),
    (["--steps", "0"], "warm_start.demo_steps=0: must be >= 1"),
    (["--episode-requests", "4"], "warm_start.demo_episode_requests=4: must be >= 8"),
    (["--scenario", "moon"], "env_kwargs.scenario='moon': unknown scenario"),
    (["--qps", "0"], "env_kwargs.workload.qps=0.0: must be a finite rate > 0"),
    (["--seed", "-1"], "seed=-1: must be in"),
    (["--num-envs", "0"], "--num-envs=0: must be >= 1"),
    (["--steps", "100", "--episode-requests", "200"], "episode_requests=200: exceeds the 100"),
    (["--scenario", "heterogeneous", "--replicas", "3"], "env_kwargs.num_replicas=3: conflicts"),
    (["--imbalance", "--imbalance-low", "2"], "imbalance.high_factor=1.4: must exceed low_factor"),
    (["--imbalance", "--imbalance-fraction", "0"], "imbalance.fraction=0.0: must be in (0, 1]"),
    (["--policy", "lor", "--policies", "lor:1"], "not allowed with argument"),
])
def test_cli_rejects_bad_values_before_any_work(argv, expected, tmp_path, capsys, monkeypatch):
    cli = _cli()
    monkeypatch.setattr(cli, "collect_demonstrations", pytest.fail)  # no work may start
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit):
        _cli().main(["--output", str(tmp_path), "--steps", "64", "--episode-requests", "64"])
    assert f"--output='{tmp_path}'" in capsys.readouterr().err


def test_cli_collects_prints_a_summary_and_writes_the_output(tmp_path, capsys):
    out = tmp_path / "demos"
    argv = ["--policies", "lor:0.75,round_robin:0.25", "--steps", "256", "--episode-requests",
            "64", "--seed", "5", "--no-progress", "--output", str(out)]
    stats = _cli().main(argv)
    printed = capsys.readouterr().out
    assert "round_robin" in printed and "balance" in printed and "E2E mean s" in printed
    assert "0.250 0.250 0.250 0.250" in printed  # round robin's action distribution
    trajs, loaded = load_demonstrations(out)
    assert loaded["command"][1:] == argv
    assert loaded["cli_args"]["warm_start"]["demo_policies"] == {"lor": 0.75, "round_robin": 0.25}
    assert EnvConfig.from_kwargs(**loaded["env_kwargs"]) == SMALL_CONFIG
    assert [loaded["policies"][p]["steps"] for p in ("lor", "round_robin")] == [192, 64]
    assert loaded["total_steps"] == stats["total_steps"] == 256
    direct, _ = collect_demonstrations(imbalance=False, env_config=SMALL_CONFIG,
                                       policies={"lor": 0.75, "round_robin": 0.25},
                                       total_steps=256, seed=5)
    assert _same_trajectories(trajs, direct)


# ------------------------------------------------------------------------- family demos
def test_family_demonstrations_round_trip_through_the_store(tmp_path):
    """A family set routes to any of its ``replica_slots`` (the family layout's ``num_replicas``
    is a placeholder of 1): it loads back whole instead of being refused as out of range."""
    from llm_cluster_env.env.family import load_family
    from sb3_warmstart.warmstart.family_demos import collect_best_heuristic_demonstrations

    family = load_family("generalist", {"replicas": [2, 4], "replica_slots": 5,
                                        "episode_requests": 16, "capacity_requests": 100})
    trajs, stats = collect_best_heuristic_demonstrations(
        family=family, total_steps=48, seed=0, candidates=("lor", "round_robin"))
    assert stats["schema"]["num_replicas"] == 1 and stats["schema"]["replica_slots"] == 5
    assert max(int(t.acts.max()) for t in trajs) >= 1  # the case the old check refused
    path = save_demonstrations(tmp_path / "family", trajs, stats)
    loaded, loaded_stats = load_demonstrations(path)
    assert _same_trajectories(trajs, loaded)
    assert loaded_stats["trajectory_policies"] == stats["trajectory_policies"]
    # an action past the slots is still refused, naming the bound
    bad = [trajs[0].__class__(obs=trajs[0].obs, acts=np.full_like(trajs[0].acts, 5),
                              infos=trajs[0].infos, terminal=True, rews=trajs[0].rews),
           *trajs[1:]]
    save_demonstrations(tmp_path / "bad", bad, stats)
    with pytest.raises(ValueError, match=r"actions outside \[0, 5\)"):
        load_demonstrations(tmp_path / "bad")


def test_family_demonstrations_pick_the_expert_by_the_chosen_objective():
    """``objective="mean_ttft"`` keeps, per episode, the candidate with the least mean TTFT
    (the first within the margin), not the least mean E2E; an unknown objective is refused."""
    from llm_cluster_env.env.family import load_family
    from sb3_warmstart.warmstart.family_demos import collect_best_heuristic_demonstrations

    family = load_family("generalist", {"replicas": [2, 4], "replica_slots": 4,
                                        "episode_requests": 24, "capacity_requests": 100})
    candidates = ("round_robin", "least_ttft", "least_added_time")
    trajs, stats = collect_best_heuristic_demonstrations(
        family=family, total_steps=96, seed=3, candidates=candidates, margin=0.0,
        objective="mean_ttft")
    assert stats["objective"] == "mean_ttft"
    for t, expert in zip(trajs, stats["trajectory_policies"], strict=True):
        score = t.infos[-1]["candidates_mean_ttft"]
        assert set(score) == set(candidates)
        assert score[expert] == min(score.values())
        assert expert == next(n for n in candidates if score[n] == min(score.values()))
        assert t.infos[-1]["metrics"]["ttft_mean"] == score[expert]
    with pytest.raises(ValueError, match="objective='goodput'"):
        collect_best_heuristic_demonstrations(family=family, total_steps=8, seed=0,
                                              candidates=candidates, objective="goodput")


def test_config_refuses_an_unknown_demo_objective():
    from llm_cluster_env.validation import ConfigError
    from sb3_warmstart.pipeline.config import load_config

    with pytest.raises(ConfigError, match="demo_objective.*p99"):
        load_config(None, overrides={"warm_start": {"demo_objective": "p99"}})
