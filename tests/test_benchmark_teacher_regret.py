"""benchmarks/teacher_regret.py: a router's regret in the teacher's own costs on the states a
policy visits. The teacher against itself has none; the policy's regret equals the one
DAgger's labelling records on the same episodes; bad input is refused naming the option."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.train

import torch as th  # noqa: E402

from benchmarks import teacher_regret  # noqa: E402
from llm_cluster_env.env.family import ScenarioFamilyEnv, load_family  # noqa: E402
from sb3_warmstart.pipeline.config import BCConfig, PPOConfig  # noqa: E402
from sb3_warmstart.warmstart.dagger import (  # noqa: E402
    DAggerConfig,
    label_episodes,
    load_round_policy,
    make_teacher,
    run_dagger,
)

FAMILY = load_family("generalist", {"replicas": [2, 4], "replica_slots": 4,
                                    "gpus": {"a100": 1.0, "h100": 1.0}, "mixed_gpus": 0.0,
                                    "episode_requests": 30, "capacity_requests": 50})


@pytest.fixture(scope="module")
def policy_zip(tmp_path_factory):
    """Round 0 of a tiny DAgger run: a clone of least_added_time across the family."""
    th.set_num_threads(1)
    out = tmp_path_factory.mktemp("clone")
    run_dagger(DAggerConfig(teacher="least_added_time", rounds=1, episodes_per_round=2,
                            episode_seed_base=100),
               spec=FAMILY, bc=BCConfig(epochs=2, batch_size=4, sequence_length=8),
               ppo=PPOConfig(set_embed_dim=16, set_hidden_dim=16), out=out)
    return out / "policy_round_0.zip"


def test_regret_is_the_teachers_cost_of_each_choice_above_its_least(policy_zip):
    env = ScenarioFamilyEnv(FAMILY)
    seeds = [7, 8, 9]
    rows, least = teacher_regret.measure(policy_zip, env, ["lookahead", "least_added_time"],
                                         seeds)
    by = {r.name: r for r in rows}
    assert by["lookahead"].regret_s == [0.0] * 3 and by["lookahead"].disagree == [0.0] * 3
    for row in rows:
        assert len(row.regret_s) == 3 and min(row.regret_s) >= 0
        assert all(0 <= d <= 1 for d in row.disagree)
    # the same episodes through DAgger's labelling, which keeps the teacher's costs
    data = label_episodes(env, make_teacher("lookahead"), load_round_policy(policy_zip.parent, 0),
                          seeds, beta=0.0, seed=0, round_index=1)
    regret = data.costs[np.arange(data.num_states), data.actions] - data.costs.min(axis=1)
    per_episode = [chunk.mean() for chunk in np.split(regret, np.cumsum(data.lengths)[:-1])]
    np.testing.assert_allclose(by["policy"].regret_s, per_episode, rtol=1e-9, atol=1e-12)
    per_least = [chunk.mean() for chunk in np.split(data.costs.min(axis=1),
                                                    np.cumsum(data.lengths)[:-1])]
    np.testing.assert_allclose(least, per_least, rtol=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--policy", "distilled:no/such/run"], "--policy='distilled:no/such/run': no policy file"),
    (["--policy", "x.zip", "--episodes", "0"], "--episodes=0: must be >= 1"),
])
def test_bad_input_is_refused_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        teacher_regret.main(argv)
    assert message in str(stop.value) + capsys.readouterr().err
