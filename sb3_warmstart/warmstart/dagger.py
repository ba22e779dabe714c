"""DAgger (Ross, Gordon, Bagnell 2011) for our routing policies: the learner drives, a teacher
router labels the states the learner visits, behaviour cloning retrains on the aggregate.

Rounds (``k = 0 .. config.rounds``):

* **round 0**: the teacher routes ``episodes_per_round`` episodes itself and labels them
  (plain behaviour-cloning demonstrations); ``policy_round_0`` is their clone. Or, with
  ``initial_policy`` (the main job: its clone of the best heuristic per scenario), that policy
  *is* round 0 (copied to ``policy_round_0.zip``; nothing is labelled);
* **round k >= 1**: ``policy_round_{k-1}`` routes ``episodes_per_round`` fresh episodes (greedy
  or sampled: ``config.deterministic``); before every step the teacher's ``select(env.view)``
  labels the state (on the same env state the policy acts on); with probability ``beta_k =
  beta * beta_decay ** (k - 1)`` the teacher's action is executed instead of the policy's (the
  paper's mixture; ``beta = 0``, the default, is pure on-policy DAgger). The labelled states
  join the aggregate, and ``policy_round_k`` is cloned on the aggregate of rounds ``0 .. k``
  (plus ``demos`` when given) with :func:`~sb3_warmstart.warmstart.cloning.clone_demonstrations`
  (the project's :class:`~sb3_warmstart.warmstart.bc.SequenceBC`: one imitation ``Trajectory``
  per episode, observations = the visited states, actions = the teacher's labels), from
  scratch, or (``fine_tune``) from ``policy_round_{k-1}``'s weights and input scaling.

Across a scenario family (``spec`` a
:class:`~llm_cluster_env.env.family.ScenarioFamilyConfig`) every episode seed draws its own
cluster and workload (:class:`~llm_cluster_env.env.family.ScenarioFamilyEnv`); the teacher
labels through ``env.view`` (the current scenario's routing context), a planner is bound to
the scenario's inner env after each reset, and the teacher's features are checked against
the family's layout.

**The main job's choice** (``dagger`` section of :mod:`sb3_warmstart.pipeline.config`;
measured 2026-12-04, seed 0, on 20 scenarios drawn from the ``generalist`` family with seeds
50,000-50,019 -- not the report's held-out 100,000+ -- one 1,000-request episode each, greedy;
relative mean E2E, geometric mean over scenarios, paired 95% bootstrap interval vs the clone).
Round 0 is the job's clone (64 episodes, 16,384 states of the best heuristic per scenario);
3 rounds of 4,096 states labelled by ``lookahead`` (16 episodes of 256 requests, or 8 of 512),
10 BC epochs per round::

    policy                                 vs least_added_time  vs clone [95% CI]      worst vs lat
    clone (round 0)                        +0.13%               --                     +3.0%
    lookahead (the teacher itself)         -0.17%               -0.30% [-1.38, +0.81]  +7.0%
    256-request episodes:
    teacher labels only, fine-tuned        +0.44%               +0.31% [-0.46, +1.07]  +4.3%
    demos + teacher labels, fine-tuned     -0.03%               -0.16% [-0.62, +0.22]  +1.4%
    demos + teacher labels, from scratch   +0.14%               +0.01% [-0.58, +0.46]  +1.5%
    512-request episodes:
    demos + teacher labels, fine-tuned     -0.24%               -0.37% [-0.97, +0.09]  +0.9%

So the aggregate keeps the heuristic-labelled demonstrations beside the teacher-labelled
states, every round fine-tunes the previous one, and the episodes are 512 requests long
(``include_demos: true``, ``fine_tune: true``, ``episode_requests: 512``): the lowest mean
and the smallest worst case, at the same number of labels. Without the demonstrations the policy drifts to ``lookahead``'s choices where it
cannot tell them apart from the observation (its on-policy agreement with ``lookahead`` stays
at 0.52-0.58 over the rounds in every variant, BC's train accuracy at 0.69-0.71 on the labels
alone, 0.76-0.81 with the demos), which costs most on the scenarios where ``lookahead``
itself loses (it is greedy: +3.4% and +7.0% on two of the 20). The longer episodes reach the
congested states the 1,000-request evaluation episodes spend most of their time in. None of
the differences is resolved at 20 scenarios: ``lookahead`` beats ``least_added_time`` on 14
of them but by -0.17% overall, so there is little for distillation to gain on this family.
More rounds did not help monotonically (256-request variant: round 1 +0.00%, round 2 +0.37%,
round 3 -0.03% vs ``least_added_time``). Cost: 10-14 s of CPU to label a round (4,096
states, 2.3-3.3 ms per state with the policy's own step), 12-20 s to retrain on the demos
plus the aggregate: 72 s (256-request episodes) or 85 s (512) for 3 rounds.

**The amount of labels** (2026-12-05, on the held-out 12-cell grid of
``docs/generalisation.md``: 10 paired seeds x 1,500 requests per cell, training seeds 0-2):
the table above used 8 episodes per round (12,288 labels in 3 rounds). 16 episodes changed
nothing shown (-0.07% [-0.13, -0.01] vs 8, the seeds disagreeing); **64 episodes** (98,304
labels, the default since then) made the distilled policy -0.20% [-0.26, -0.13] vs 8, better
on every training seed, -0.14% [-0.23, -0.05] vs each cell's best heuristic and +0.30%
[+0.22, +0.39] behind ``lookahead``. It costs ~4 min more of CPU (the whole job ~7.5 min).
``rollout_planner`` is not the default teacher: it cannot sample the futures of the family's
phased arrivals (a fifth of its scenarios; the job's ``check_teacher`` refuses it
there) and costs 20-30 ms per decision on 4 replicas (~100 s per
round of 4,096 states), more on the family's 16.

**Alternative teachers** (``alternative_teachers``): a teacher that is better on average can
still lose on some scenarios (``lookahead``, greedy, is +3.2% worse than ``least_added_time``
on the held-out grid's ``conv_3gpu_93``, and distillation copies that). With alternatives,
before an episode is labelled :func:`choose_teacher` lets ``teacher`` and every alternative
route that same episode alone, and the first of them (``teacher`` first) whose ``objective``
is within ``teacher_margin`` of the lowest labels it: the demonstrations' best-per-scenario
rule applied to the teacher. The choice is made once per episode (the learner's states are
labelled by one rule throughout), stored with the round (``RoundData.teachers`` and the
scores), and costs one extra episode per teacher per labelled episode. Without alternatives
the run's settings and fingerprint are those of runs made before they existed. Measured
2026-12-04 (the main job, ``[least_added_time]``, training seeds 0-2, the held-out grid of
``benchmarks/generalisation.py``; ``docs/generalisation.md``): ``least_added_time`` labelled 8
of the 72 episodes, and the distilled policy was level with the default's (-0.01%
[-0.08, +0.05] mean E2E), so the job's default stays without alternatives.

**Soft labels from the teacher's costs** (``cost_temperature``): a teacher that prices every
replica (``lookahead``: :meth:`~llm_cluster_env.routing.lookahead.LookaheadRouter.costs`, the
added request-seconds) says more than its choice. Every round keeps those costs
(``RoundData.costs``) and, with ``cost_temperature > 0``, BC learns the distribution
:func:`soft_labels` makes of them instead of the choice alone: near-ties share the weight and
a costly mistake gets almost none. Without it the settings and fingerprint are those of runs
made before it existed. Measured 2026-12-05 (the main job at ``0.02``, training seeds 0-2;
``docs/generalisation.md``): the distilled policy's regret in ``lookahead``'s costs on the
states it visits fell by a tenth (0.64 to 0.57 s per decision, ``benchmarks/teacher_regret.py``;
``least_added_time`` on the same states: 0.58-0.59 s), yet its mean E2E on the held-out grid
did not move (-0.01% [-0.07, +0.05] vs the default's), so the default stays at 0.

The teacher is any name of :func:`~llm_cluster_env.routing.registry.make_any_router`. It is
driven as :func:`llm_cluster_env.tools.evaluation.run_episode` drives a router: the env is
checked to provide the features it reads (``observe_for``), then computes the whole observation
(the policy reads all of it); planners are ``bind(env)``-ed after each reset; the teacher's
generator is ``default_rng(seed + 7919)`` as in ``run_episode``. A teacher whose ``select``
records its own decision (``round_robin``) labels as if its previous choices had been executed;
the observation-only and env-reading teachers (``least_added_time``, ``lookahead``,
``rollout_planner``, the cache-aware ones, whose index lives in the env) do not.

Kill-safe and resumable. In ``out``: ``dagger.json`` (the config and its fingerprint),
``round_<k>.npz`` (the labelled states of round ``k``) and ``round_<k>.json`` (fingerprint and
counts), both written atomically *before* training on them, and ``policy_round_<k>.zip``
(:func:`~sb3_warmstart.policies.policy_file.save_pretrained`) after. A rerun with the same
config resumes at the first round whose policy file is missing, reusing every round's labels
already on disk (a round counts as labelled once its JSON, written after its npz, is there);
a rerun with another config is refused with a :class:`~llm_cluster_env.validation.ConfigError`
naming the differing keys. Everything is a function of the config: episode seeds
``seed + k * episodes_per_round + i``, the mixing and sampling generators seeded by
``(seed, k, i)``, BC seeded by ``seed`` (so an interrupted and resumed run produces the same
rounds, labels and weights as an uninterrupted one, with torch on one thread).

Why not imitation's ``DAggerTrainer`` / ``SimpleDAggerTrainer`` (imitation 1.0.0,
``imitation/algorithms/dagger.py``): (1) its expert is a ``BasePolicy`` called through
``predict`` on the VecEnv's observation array, so a teacher that needs the routing context
(``lookahead``, ``rollout_planner``: ``requires_context``) or ``bind(env)`` cannot label, and
the heuristics would need a policy adapter each; (2) it trains with imitation's ``bc.BC``
(shuffled transitions, its own loss), not our ``SequenceBC`` (the replica-set policy's fitted
input scaling, tie-aware accuracy, the recurrent path); (3) the learner's actions come from
``policy.predict`` (torch's global generator when sampling) and its checkpoints are a
``th.save`` pickle of the whole trainer plus demo files with random names, neither atomic nor
tied to a config fingerprint, so a resume can neither prove it relabels nothing nor refuse
another config. The loop is short enough to own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from imitation.data.types import Trajectory

from llm_cluster_env.atomic import atomic_write_bytes, atomic_write_json
from llm_cluster_env.config import EnvConfig
from llm_cluster_env.env.cluster_env import LLMClusterEnv
from llm_cluster_env.env.family import ScenarioFamilyConfig, ScenarioFamilyEnv
from llm_cluster_env.routing.base import Router
from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.routing.lookahead import LookaheadRouter
from llm_cluster_env.routing.registry import ALL_ROUTERS, make_any_router
from llm_cluster_env.tools.objectives import DEMO_OBJECTIVES, make_objective
from llm_cluster_env.validation import ConfigError, require, to_dict
from sb3_warmstart.pipeline.config import (
    BCConfig,
    DistillationConfig,
    PPOConfig,
    WarmStartConfig,
)
from sb3_warmstart.pipeline.progress import ProgressPrinter
from sb3_warmstart.policies.policy_file import load_pretrained, save_pretrained
from sb3_warmstart.policies.router import PolicyRouter
from sb3_warmstart.warmstart.cloning import clone_demonstrations

MANIFEST = "dagger.json"
#: ``round_index`` of :func:`policy_agreement`'s generators (distinct from any round's).
AGREEMENT_STREAM = 2**31 - 1
FORMAT_VERSION = 2
#: Episode seeds are drawn below this bound (``2**62``: sums with the round offsets stay int64).
_SEED_BOUND = 2**62


# ---------------------------------------------------------------------------------- config
_SECTION = DistillationConfig  # the pipeline's ``dagger`` section: the one home of the defaults


@dataclass(frozen=True)
class DAggerConfig:
    """The DAgger loop (see the module docstring). The knobs it shares with the pipeline's
    ``dagger`` section (:class:`~sb3_warmstart.pipeline.config.DistillationConfig`) take their
    defaults from there.

    :param teacher: router name (:data:`~llm_cluster_env.routing.registry.ALL_ROUTERS`) that
        labels every visited state and routes round 0.
    :param rounds: DAgger rounds after round 0 (>= 1); ``rounds + 1`` policies are trained.
    :param episodes_per_round: episodes routed and labelled per round (>= 1).
    :param deterministic: the policy takes its most likely replica (True) or samples one.
    :param beta: probability, in round 1, of executing the teacher's action instead of the
        policy's, in [0, 1].
    :param beta_decay: ``beta_k = beta * beta_decay ** (k - 1)``, in [0, 1].
    :param validation_fraction: share of the aggregate's episodes BC holds out, in [0, 1)
        (> 0 needs ``episodes_per_round >= 2``).
    :param seed: episode seeds, mixing/sampling generators and BC.
    :param fine_tune: round ``k``'s clone starts from round ``k - 1``'s weights (and input
        scaling) instead of fresh ones.
    :param episode_seed_base: first episode seed (``None``: ``seed``); episode ``i`` of round
        ``k`` is served with ``episode_seed_base + k * episodes_per_round + i``.
    :param alternative_teachers: routers that label an episode instead of ``teacher`` when
        they serve it better (:func:`choose_teacher`; empty: ``teacher`` labels every one).
    :param teacher_margin: relative ``objective`` margin within which an earlier teacher
        (``teacher`` first) counts as the best of an episode, in [0, 1).
    :param cost_temperature: BC learns from the teacher's costs instead of its choices where
        it gives them (``lookahead``): :func:`soft_labels` at this relative temperature, >= 0
        (0: the teacher's choice alone).
    :param objective: what the teachers are ranked by, one of
        :data:`~llm_cluster_env.tools.objectives.DEMO_OBJECTIVES` (the main job passes its
        ``warm_start.demo_objective``, whose default this is).
    """

    teacher: str = _SECTION.teacher
    rounds: int = _SECTION.rounds
    episodes_per_round: int = _SECTION.episodes_per_round
    deterministic: bool = _SECTION.deterministic
    beta: float = _SECTION.beta
    beta_decay: float = _SECTION.beta_decay
    validation_fraction: float = 0.0
    seed: int = 0
    fine_tune: bool = _SECTION.fine_tune
    episode_seed_base: int | None = None
    alternative_teachers: tuple[str, ...] = _SECTION.alternative_teachers
    teacher_margin: float = _SECTION.teacher_margin
    objective: str = WarmStartConfig.demo_objective
    cost_temperature: float = _SECTION.cost_temperature

    def __post_init__(self) -> None:
        require(isinstance(self.cost_temperature, (int, float))
                and not isinstance(self.cost_temperature, bool)
                and 0.0 <= self.cost_temperature < float("inf"), "cost_temperature",
                self.cost_temperature, "must be a finite number >= 0")
        require(isinstance(self.teacher, str) and self.teacher in ALL_ROUTERS, "teacher",
                self.teacher, f"must be a router name ({', '.join(ALL_ROUTERS)})")
        require(isinstance(self.alternative_teachers, (tuple, list)), "alternative_teachers",
                self.alternative_teachers, "must be a list of router names")
        object.__setattr__(self, "alternative_teachers", tuple(self.alternative_teachers))
        for name in self.alternative_teachers:
            require(isinstance(name, str) and name in ALL_ROUTERS, "alternative_teachers", name,
                    f"must be a router name ({', '.join(ALL_ROUTERS)})")
        require(len(set(self.teachers)) == len(self.teachers), "alternative_teachers",
                list(self.alternative_teachers), "must not repeat a router or the teacher")
        require(isinstance(self.teacher_margin, (int, float))
                and not isinstance(self.teacher_margin, bool)
                and 0.0 <= self.teacher_margin < 1.0, "teacher_margin", self.teacher_margin,
                "must be a number in [0, 1)")
        require(self.objective in DEMO_OBJECTIVES, "objective", self.objective,
                f"must be one of {DEMO_OBJECTIVES}")
        for name in ("rounds", "episodes_per_round"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    name, value, "must be an integer >= 1")
        for name in ("deterministic", "fine_tune"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name),
                    "must be true or false")
        for name in ("beta", "beta_decay"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool)
                    and 0.0 <= value <= 1.0, name, value, "must be a number in [0, 1]")
        require(isinstance(self.validation_fraction, (int, float))
                and 0.0 <= self.validation_fraction < 1.0, "validation_fraction",
                self.validation_fraction, "must be in [0, 1)")
        require(self.validation_fraction == 0 or self.episodes_per_round >= 2,
                "validation_fraction", self.validation_fraction,
                f"needs episodes_per_round >= 2 (got {self.episodes_per_round}): round 0's "
                "clone holds out whole episodes")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                "seed", self.seed, "must be an integer >= 0")
        if self.episode_seed_base is not None:
            base = self.episode_seed_base
            require(isinstance(base, int) and not isinstance(base, bool)
                    and 0 <= base < _SEED_BOUND, "episode_seed_base", base,
                    "must be an integer in [0, 2**62) or null")

    @property
    def teachers(self) -> tuple[str, ...]:
        """Every router that may label an episode, in order of preference."""
        return (self.teacher, *self.alternative_teachers)

    def beta_at(self, round_index: int) -> float:
        """Probability of executing the teacher's action in round ``round_index`` (1 in round
        0, where the teacher routes)."""
        return 1.0 if round_index == 0 else self.beta * self.beta_decay ** (round_index - 1)

    def episode_seeds(self, round_index: int) -> list[int]:
        n = self.episodes_per_round
        base = self.seed if self.episode_seed_base is None else self.episode_seed_base
        return [base + round_index * n + i for i in range(n)]


# ------------------------------------------------------------------------------ round data
def soft_labels(costs: np.ndarray, labels: np.ndarray, num_actions: int,
                temperature: float) -> np.ndarray:
    """Cost-sensitive labels: row ``j`` is ``softmax(-(c - c_min) / (temperature * c_min))``
    over the teacher's costs ``c = costs[j]`` (seconds; ``+inf`` for actions that do not exist,
    which get 0), so replicas nearly as good as the best share the probability and a costly
    mistake gets almost none. ``temperature`` is relative to the best cost (``0.02``: a
    replica 2% worse than the best gets ``1/e`` of its weight). One-hot ``labels`` where
    ``temperature`` is 0, the costs are missing (``costs`` of width 0, or a NaN row) or the
    best cost is not positive. Returns ``(N, num_actions)`` float32 rows summing to 1."""
    n = len(labels)
    out = np.zeros((n, num_actions), np.float32)
    out[np.arange(n), labels] = 1.0
    if temperature <= 0 or costs.shape[1] == 0 or n == 0:
        return out
    width = min(costs.shape[1], num_actions)
    c = np.asarray(costs[:, :width], np.float64)
    best = np.min(c, axis=1)
    usable = np.isfinite(best) & (best > 0) & ~np.isnan(c).any(axis=1)
    if not usable.any():
        return out
    c, best = c[usable], best[usable]
    with np.errstate(invalid="ignore", over="ignore"):
        logits = -(c - best[:, None]) / (temperature * best[:, None])
    weights = np.where(np.isfinite(c), np.exp(logits), 0.0)
    rows = np.zeros((len(c), num_actions), np.float64)
    rows[:, :width] = weights / weights.sum(axis=1, keepdims=True)
    out[usable] = rows.astype(np.float32)
    return out


@dataclass(frozen=True)
class RoundData:
    """The labelled states of one round, episode after episode.

    ``obs[j]`` is the observation the teacher labelled ``labels[j]`` and on which
    ``actions[j]`` was executed (``teacher_acted[j]``: the teacher's); episode ``e`` has
    ``lengths[e]`` rows, was served with seed ``seeds[e]``, ended in ``final_obs[e]`` and was
    labelled by the router ``teachers[e]`` (with alternative teachers, chosen by
    :func:`choose_teacher`, whose objective values are ``teacher_scores[e]``; ``""`` and no
    scores in rounds written before alternatives existed: the run's teacher).
    """

    obs: np.ndarray          # (N, D) float32
    labels: np.ndarray       # (N,) int64
    actions: np.ndarray      # (N,) int64
    teacher_acted: np.ndarray  # (N,) bool
    lengths: np.ndarray      # (E,) int64
    seeds: np.ndarray        # (E,) int64
    final_obs: np.ndarray    # (E, D) float32
    teachers: np.ndarray     # (E,) str
    teacher_scores: np.ndarray  # (E, T) float64, T = 0 when only one teacher could label
    costs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    #: (N, A) float64: the labeller's cost (s) of each action at each state, +inf past the
    #: scenario's replicas, NaN rows where the labeller gives no costs; (N, 0) in rounds
    #: written before costs were kept.

    @property
    def num_states(self) -> int:
        return int(self.lengths.sum())

    def trajectories(self) -> list[Trajectory]:
        """One imitation ``Trajectory`` per episode: the visited states, the teacher's labels."""
        out = []
        start = 0
        for e, n in enumerate(self.lengths.tolist()):
            obs = np.concatenate([self.obs[start:start + n], self.final_obs[e][None]])
            out.append(Trajectory(obs=obs, acts=self.labels[start:start + n].copy(),
                                  infos=None, terminal=True))
            start += n
        return out

    def action_targets(self, num_actions: int, temperature: float) -> list[np.ndarray]:
        """Per episode, the ``(steps, num_actions)`` soft labels :func:`soft_labels` makes of
        the stored costs at relative ``temperature`` (one-hot labels where none were kept)."""
        targets = soft_labels(self.costs, self.labels, num_actions, temperature)
        return np.split(targets, np.cumsum(self.lengths)[:-1])

    def agreement(self) -> float:
        """Share of the states where the executed action was the teacher's label."""
        return float(np.mean(self.actions == self.labels)) if len(self.labels) else float("nan")

    def to_bytes(self) -> bytes:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return buffer.getvalue()

    def teacher_counts(self) -> dict[str, int]:
        """Episodes labelled by each router (``""``: the run's teacher, in older rounds)."""
        names, counts = np.unique(self.teachers.astype(str), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}

    @classmethod
    def load(cls, path: str | Path) -> RoundData:
        with np.load(path) as data:
            fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        episodes = len(fields["lengths"])
        fields.setdefault("teachers", np.full(episodes, "", dtype="<U1"))  # format-2 rounds
        fields.setdefault("teacher_scores", np.zeros((episodes, 0)))
        fields.setdefault("costs", np.zeros((len(fields["labels"]), 0)))  # before costs
        return cls(**fields)


@dataclass(frozen=True)
class RoundEvent:
    """Passed to the ``callback`` of :func:`run_dagger`: ``stage`` ``"labelled"`` right after
    round ``round_index``'s data is on disk (``resumed``: it was already), ``"trained"`` right
    after its policy is."""

    round_index: int
    stage: Literal["labelled", "trained"]
    path: Path
    resumed: bool = False


@dataclass
class DAggerResult:
    """What :func:`run_dagger` leaves: the rounds' data and policy files, BC summaries of the
    rounds trained in this call, and the last policy."""

    out: Path
    rounds: list[RoundData]
    policy_paths: list[Path]
    bc_summaries: dict[int, dict[str, Any]]
    final_router: PolicyRouter
    first_round: int = 0  # 1 when round 0 was an initial policy (``rounds[0]`` is round 1)

    @property
    def aggregate_states(self) -> int:
        return sum(r.num_states for r in self.rounds)


# ------------------------------------------------------------------------------- labelling
def make_teacher(name: str) -> Router:
    """The teacher router by name (:func:`make_any_router`)."""
    return make_any_router(name)


#: An env DAgger routes: one scenario, or a family serving a new scenario every episode.
DAggerEnv = LLMClusterEnv | ScenarioFamilyEnv


def scenario_env(env: DAggerEnv) -> LLMClusterEnv:
    """The env of the current episode's scenario: ``env`` itself, or a family's inner env
    (a new object after every ``reset``; planners are bound to it)."""
    return env.env if isinstance(env, ScenarioFamilyEnv) else env


def check_teacher(env: DAggerEnv, teacher: Router) -> None:
    """Refuse a teacher that reads a per-replica feature the env does not provide (a
    ``ValueError`` naming the router and the feature), before any episode runs."""
    if isinstance(env, ScenarioFamilyEnv):
        missing = [f for f in getattr(teacher, "reads", None) or () if f not in env.layout.column]
        if missing:
            raise ValueError(f"router {teacher.name!r} reads the feature {missing[0]!r}, which "
                             f"the family {env.family.name!r} does not provide (per-replica "
                             f"features: {', '.join(env.layout.replica_features)})")
        return  # every episode's env is new and computes the whole observation
    env.observe_for(teacher)
    env.observe_for(None)


def start_episode(env: DAggerEnv, router: Router, episode_seed: int) -> None:
    """Reset ``env`` to the episode of ``episode_seed`` and ``router`` for it, as
    :func:`llm_cluster_env.tools.evaluation.run_episode` does: a planner is bound to the
    scenario's env after the reset, the router draws from ``default_rng(episode_seed + 7919)``."""
    env.reset(seed=int(episode_seed))
    bind = getattr(router, "bind", None)
    if bind is not None:
        bind(scenario_env(env))
    router.reset(env.num_replicas, np.random.default_rng(int(episode_seed) + 7_919))


def route_alone(env: DAggerEnv, router: Router, episode_seed: int) -> dict[str, float]:
    """The episode metrics of ``router`` routing the episode of ``episode_seed`` by itself."""
    start_episode(env, router, episode_seed)
    done = False
    info: dict[str, Any] = {}
    while not done:
        _, _, terminated, truncated, info = env.step(int(router.select(env.view)))
        done = terminated or truncated
    return {k: float(v) for k, v in info["metrics"].items()}


def choose_teacher(env: DAggerEnv, teachers: Sequence[Router], episode_seed: int, *,
                   objective: str, margin: float) -> tuple[int, np.ndarray]:
    """Which of ``teachers`` labels the episode of ``episode_seed``: each routes that episode
    alone (:func:`route_alone`, the same cluster and requests for all), and the first whose
    ``objective`` loss is within ``margin`` of the lowest wins (the demonstrations' rule,
    :mod:`sb3_warmstart.warmstart.family_demos`: a later teacher must be better by more than
    the margin to replace an earlier one).

    :return: ``(index into teachers, every teacher's objective value)``.
    """
    scorer = make_objective(objective)
    metrics = [route_alone(env, router, episode_seed) for router in teachers]
    losses = np.array([scorer.loss(m) for m in metrics])
    lowest = float(losses.min())
    best = next(i for i, loss in enumerate(losses) if loss <= lowest + abs(lowest) * margin)
    return best, np.array([scorer.value(m) for m in metrics], dtype=np.float64)


def label_episodes(env: DAggerEnv, teacher: Router, policy: PolicyRouter | None,
                   seeds: Sequence[int], *, beta: float, seed: int, round_index: int,
                   alternatives: Sequence[Router] = (), margin: float = 0.0,
                   objective: str = "mean_e2e",
                   on_episode: Callable[[int, int], None] | None = None) -> RoundData:
    """Route one episode per seed and label every visited state with ``teacher`` (or, with
    ``alternatives``, with whichever of ``teacher, *alternatives`` :func:`choose_teacher` picks
    for that episode by ``objective`` and ``margin``).

    Before each step the teacher's ``select(env.view)`` gives the label (a ``lookahead``
    teacher's is the least of its ``costs(env.view)``, which are kept; see
    :func:`soft_labels`); the executed action is
    the teacher's when ``policy`` is None, else the teacher's with probability ``beta`` (drawn
    from ``default_rng((seed, round_index, i, 1))``) and the policy's otherwise (the policy
    selects on every step, so a recurrent policy keeps its state; sampling draws from
    ``default_rng((seed, round_index, i, 2))``).

    :param env: the unwrapped env (one scenario) or a
        :class:`~llm_cluster_env.env.family.ScenarioFamilyEnv` (``reset(seed=s)`` draws the
        scenario of seed ``s``); it computes the whole observation during the episodes, and a
        planner teacher is bound to the scenario's env after every reset.
    :param on_episode: called after every episode with (episodes done, states labelled).
    """
    candidates = [teacher, *alternatives]
    for router in candidates:  # refuses a teacher reading a feature this env lacks
        check_teacher(env, router)
    obs_rows, labels, actions, by_teacher, lengths, finals = [], [], [], [], [], []
    names, scores, cost_rows = [], [], []
    width = int(env.action_space.n)
    for i, ep_seed in enumerate(seeds):
        labeller = teacher
        if alternatives:
            chosen, values = choose_teacher(env, candidates, int(ep_seed), objective=objective,
                                            margin=margin)
            labeller = candidates[chosen]
            scores.append(values)
        names.append(labeller.name)
        start_episode(env, labeller, int(ep_seed))
        mix = np.random.default_rng((seed, round_index, i, 1))
        if policy is not None:
            policy.reset(env.num_replicas, np.random.default_rng((seed, round_index, i, 2)))
        steps = 0
        terminated = False
        obs = None
        while not terminated:
            view = env.view
            row = np.array(view.obs, dtype=np.float32)
            costs = np.full(width, np.nan)
            if isinstance(labeller, LookaheadRouter):  # its label is the least of its costs
                costs[:] = np.inf
                found = labeller.costs(view)
                costs[:len(found)] = found
                label = int(np.argmin(found))
            else:
                label = int(labeller.select(view))
            cost_rows.append(costs)
            act = label
            teacher_acts = True
            if policy is not None:
                chosen = int(policy.select(view))
                teacher_acts = bool(mix.random() < beta) if beta > 0 else False
                act = label if teacher_acts else chosen
            obs_rows.append(row)
            labels.append(label)
            actions.append(act)
            by_teacher.append(teacher_acts)
            obs, _, terminated, truncated, _ = env.step(act)
            terminated = terminated or truncated
            steps += 1
        lengths.append(steps)
        finals.append(np.asarray(obs, dtype=np.float32))
        if on_episode is not None:
            on_episode(i + 1, len(labels))
    return RoundData(obs=np.stack(obs_rows).astype(np.float32),
                     labels=np.asarray(labels, np.int64), actions=np.asarray(actions, np.int64),
                     teacher_acted=np.asarray(by_teacher, bool),
                     lengths=np.asarray(lengths, np.int64),
                     seeds=np.asarray(list(seeds), np.int64), final_obs=np.stack(finals),
                     teachers=np.asarray(names, dtype=str),
                     teacher_scores=(np.stack(scores) if scores
                                     else np.zeros((len(names), 0), np.float64)),
                     costs=np.stack(cost_rows))


def policy_agreement(env: DAggerEnv, policy: PolicyRouter, teacher: Router,
                     seeds: Sequence[int]) -> dict[str, float]:
    """On-policy agreement: ``policy`` routes one episode per seed; the share of its decisions
    equal to the teacher's label (``exact``), and in the teacher's tie set (``tie_aware``, when
    the teacher defines one for every state; else equal to ``exact``)."""
    data = label_episodes(env, teacher, policy, seeds, beta=0.0, seed=0,
                          round_index=AGREEMENT_STREAM)
    exact = data.agreement()
    layout = env.layout
    tie_hits = []
    for row, act in zip(data.obs, data.actions):
        ties = None if teacher.requires_context else teacher.tied_choices(layout.view(row))
        if ties is None:
            return {"exact": exact, "tie_aware": exact, "states": float(data.num_states)}
        tie_hits.append(int(act) in set(np.asarray(ties).tolist()))
    return {"exact": exact, "tie_aware": float(np.mean(tie_hits)),
            "states": float(data.num_states)}


# ---------------------------------------------------------------------------- bookkeeping
def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def run_settings(config: DAggerConfig, env_kwargs: Mapping[str, Any] | None, bc: BCConfig,
                 ppo: PPOConfig, *, spec: EnvConfig | ScenarioFamilyConfig | None = None,
                 initial_policy: str | Path | None = None,
                 demos: Sequence[Trajectory] | None = None) -> dict[str, Any]:
    """Everything the run's results depend on, as JSON-able data: the loop, the env (its
    keyword arguments, or the built scenario or family ``spec``), BC, the architecture, and
    the SHA-256 of the initial policy's file and of the demonstrations' arrays."""
    loop = to_dict(config)
    if not config.alternative_teachers:  # runs made before alternatives existed still match
        for key in ("alternative_teachers", "teacher_margin", "objective"):
            loop.pop(key)
    if not config.cost_temperature:  # nor before soft labels existed
        loop.pop("cost_temperature")
    settings: dict[str, Any] = {"format": FORMAT_VERSION, "dagger": loop,
                                "env_kwargs": dict(env_kwargs or {}), "bc": to_dict(bc),
                                "ppo": to_dict(ppo)}
    if spec is not None:
        kind = "family" if isinstance(spec, ScenarioFamilyConfig) else "scenario"
        settings[kind] = to_dict(spec)
    if initial_policy is not None:
        settings["initial_policy"] = hashlib.sha256(Path(initial_policy).read_bytes()).hexdigest()
    if demos is not None:
        settings["demos"] = trajectories_digest(demos)
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def trajectories_digest(trajectories: Sequence[Trajectory]) -> str:
    """SHA-256 of the trajectories' observations and actions (tells two demo sets apart)."""
    digest = hashlib.sha256()
    for t in trajectories:
        digest.update(np.ascontiguousarray(t.obs, dtype=np.float32).tobytes())
        digest.update(np.ascontiguousarray(t.acts, dtype=np.int64).tobytes())
    return f"{len(trajectories)}:{digest.hexdigest()}"


def fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_or_write_manifest(out: Path, settings: Mapping[str, Any]) -> str:
    """Write ``out/dagger.json``, or check the one there describes ``settings``: a
    :class:`ConfigError` names every differing key otherwise."""
    path = out / MANIFEST
    fp = fingerprint(settings)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != fp:
            old, new = _flatten(stored.get("settings", {})), _flatten(settings)
            diffs = [f"{k}: {old.get(k, '<absent>')!r} on disk, {new.get(k, '<absent>')!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            raise ConfigError(f"{path}: the DAgger run there has other settings, refusing to "
                              f"resume it ({'; '.join(diffs) or 'fingerprint differs'}); use "
                              "another output folder")
        return fp
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"fingerprint": fp, "settings": dict(settings)})
    return fp


def _stored_round(out: Path, k: int, fp: str) -> RoundData | None:
    """Round ``k``'s labels if they are complete on disk (its JSON written after its npz)."""
    meta_path, data_path = out / f"round_{k}.json", out / f"round_{k}.npz"
    if not (meta_path.exists() and data_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fp:
        raise ConfigError(f"{meta_path}: fingerprint={meta.get('fingerprint')!r}, the run's "
                          f"is {fp!r}: the folder mixes runs; use another output folder")
    data = RoundData.load(data_path)
    if data.num_states != meta.get("states") or len(data.lengths) != meta.get("episodes"):
        raise ConfigError(f"{data_path}: {data.num_states} states in {len(data.lengths)} "
                          f"episodes, its manifest says {meta.get('states')} in "
                          f"{meta.get('episodes')}")
    return data


def _write_round(out: Path, k: int, fp: str, data: RoundData, beta: float) -> Path:
    path = atomic_write_bytes(out / f"round_{k}.npz", data.to_bytes())
    atomic_write_json(out / f"round_{k}.json", {
        "fingerprint": fp, "round": k, "episodes": int(len(data.lengths)),
        "states": data.num_states, "beta": beta, "seeds": data.seeds.tolist(),
        "teacher_acted": int(data.teacher_acted.sum()), "agreement": data.agreement(),
        "teachers": data.teacher_counts()})
    return path


# ------------------------------------------------------------------------------------ loop
def make_env(env_kwargs: Mapping[str, Any] | None = None,
             spec: EnvConfig | ScenarioFamilyConfig | None = None) -> DAggerEnv:
    """The env DAgger routes: ``LLMClusterEnv(**env_kwargs)``, or the built scenario or family
    ``spec`` (exactly one of the two)."""
    if (env_kwargs is None) == (spec is None):
        raise TypeError("run_dagger: give exactly one of env_kwargs and spec")
    if isinstance(spec, ScenarioFamilyConfig):
        return ScenarioFamilyEnv(spec)
    if spec is not None:
        return LLMClusterEnv(config=spec)
    return LLMClusterEnv(**dict(env_kwargs))


def _copy_initial_policy(source: str | Path, target: Path) -> None:
    if target.exists():
        return
    atomic_write_bytes(target, Path(source).read_bytes())


def run_dagger(config: DAggerConfig, *, env_kwargs: Mapping[str, Any] | None = None,
               spec: EnvConfig | ScenarioFamilyConfig | None = None, bc: BCConfig,
               ppo: PPOConfig, out: str | Path,
               callback: Callable[[RoundEvent], None] | None = None,
               progress: Callable[[str], None] | None = None,
               initial_policy: str | Path | None = None,
               demos: Sequence[Trajectory] | None = None,
               show_progress: bool = False) -> DAggerResult:
    """Run (or resume) DAgger into ``out`` (see the module docstring).

    :param config: the loop's settings.
    :param env_kwargs: keyword arguments of ``LLMClusterEnv`` (``scenario``, ...); or
    :param spec: a built :class:`~llm_cluster_env.config.EnvConfig` or a scenario family
        (a new scenario every episode, drawn from the episode's seed).
    :param bc: BC hyperparameters of every round's clone.
    :param ppo: the policy architecture (``ppo.policy``, ``ppo.algorithm``...).
    :param out: the run folder.
    :param callback: called with a :class:`RoundEvent` after each round's labels and policy are
        written (an exception from it stops the run; a rerun resumes).
    :param progress: called with a short line per stage.
    :param initial_policy: a :func:`~sb3_warmstart.policies.policy_file.save_pretrained` file
        that *is* round 0 (copied to ``policy_round_0.zip``; nothing is labelled in round 0).
    :param demos: trajectories added to every round's aggregate (labelled by whoever routed
        them, e.g. the heuristic demonstrations the initial policy was cloned from).
    :param show_progress: show each round's labelling (episodes) and cloning (epochs) as it
        goes (a bar on a terminal, a line every 10 s when the output is piped;
        :mod:`sb3_warmstart.pipeline.progress`).
    """
    if not isinstance(config, DAggerConfig):
        raise TypeError(f"config: expected a DAggerConfig, got {type(config).__name__}")
    out = Path(out)
    env = make_env(env_kwargs, spec)
    teacher = make_teacher(config.teacher)
    alternatives = [make_teacher(name) for name in config.alternative_teachers]
    for router in (teacher, *alternatives):  # one this env cannot serve: refused before work
        check_teacher(env, router)
    settings = run_settings(config, env_kwargs, bc, ppo, spec=spec,
                            initial_policy=initial_policy, demos=demos)
    fp = check_or_write_manifest(out, settings)
    say = progress or (lambda _msg: None)
    expert = (config.teacher if config.teacher in ROUTERS and not teacher.requires_context
              and demos is None and not alternatives else None)
    first = 0
    if initial_policy is not None:
        _copy_initial_policy(initial_policy, out / "policy_round_0.zip")
        first = 1

    rounds: list[RoundData] = []
    paths: list[Path] = [out / "policy_round_0.zip"] if first else []
    summaries: dict[int, dict[str, Any]] = {}
    router: PolicyRouter | None = None
    for k in range(first, config.rounds + 1):
        policy_path = out / f"policy_round_{k}.zip"
        data = _stored_round(out, k, fp)
        if policy_path.exists():
            if data is None:
                raise ConfigError(f"{policy_path}: exists but round {k}'s labels "
                                  f"(round_{k}.npz/.json) do not; the folder is damaged")
            rounds.append(data)
            paths.append(policy_path)
            router = None  # loaded below when the next round needs it
            continue
        resumed = data is not None
        if data is None:
            if k > 0 and router is None:
                router = load_round_policy(out, k - 1, config.deterministic)
            printer = ProgressPrinter(f"DAgger {k}", config.episodes_per_round, "episodes",
                                      enabled=show_progress)
            data = label_episodes(env, teacher, router if k > 0 else None,
                                  config.episode_seeds(k), beta=config.beta_at(k),
                                  seed=config.seed, round_index=k, alternatives=alternatives,
                                  margin=config.teacher_margin, objective=config.objective,
                                  on_episode=lambda done, states, shown=printer: shown.update(
                                      done, f"{states:,} states labelled"))
            printer.close()
            _write_round(out, k, fp, data, config.beta_at(k))
        by = (f" by {', '.join(f'{n} ({c})' for n, c in data.teacher_counts().items())}"
              if alternatives else "")
        say(f"round {k}: {data.num_states} states in {len(data.lengths)} episodes{by} "
            f"({'on disk' if resumed else 'labelled'}), policy agreed with the teacher on "
            f"{data.agreement():.3f}")
        rounds.append(data)
        if callback is not None:
            callback(RoundEvent(k, "labelled", out / f"round_{k}.npz", resumed))
        aggregate = sum(r.num_states for r in rounds)
        trajectories = [*(demos or ()), *(t for r in rounds for t in r.trajectories())]
        targets = None
        if config.cost_temperature:
            width = int(env.action_space.n)
            targets = [*([None] * len(demos or ())),
                       *(t for r in rounds for t in r.action_targets(width,
                                                                     config.cost_temperature))]
        init_model = init_obs_rms = None
        if config.fine_tune and k > 0:
            init_model, _, init_obs_rms = load_pretrained(out / f"policy_round_{k - 1}.zip")
        result = clone_demonstrations(
            trajectories, env=env, bc=bc, ppo=ppo, seed=config.seed,
            validation_fraction=config.validation_fraction,
            value_pretraining=False, expert=expert, init_model=init_model,
            init_obs_rms=init_obs_rms, action_targets=targets, progress=show_progress)
        metadata = result.metadata(dagger={"round": k, "fingerprint": fp,
                                           "aggregate_states": aggregate,
                                           "demo_states": sum(len(t.acts) for t in demos or ()),
                                           "teacher": config.teacher},
                                   env_kwargs=settings["env_kwargs"])
        save_pretrained(policy_path, result.model.policy, metadata, result.obs_rms,
                        observation_schema=env.layout.schema())
        summaries[k] = result.summary
        paths.append(policy_path)
        router = PolicyRouter(result.model, result.obs_rms, deterministic=config.deterministic,
                              name=f"dagger_round_{k}")
        say(f"round {k}: cloned on {aggregate} labelled states"
            f"{f' and {len(demos)} demonstrations' if demos else ''} "
            f"(train accuracy {result.summary['train_accuracy']:.3f})")
        if callback is not None:
            callback(RoundEvent(k, "trained", policy_path))
    if router is None:
        router = load_round_policy(out, config.rounds, config.deterministic)
    return DAggerResult(out=out, rounds=rounds, policy_paths=paths, bc_summaries=summaries,
                        final_router=router, first_round=first)


def load_round_policy(out: str | Path, k: int, deterministic: bool = True,
                      name: str | None = None) -> PolicyRouter:
    """``policy_round_<k>.zip`` of a DAgger run folder as a router."""
    model, _, obs_rms = load_pretrained(Path(out) / f"policy_round_{k}.zip")
    return PolicyRouter(model, obs_rms, deterministic=deterministic,
                        name=name or f"dagger_round_{k}")


__all__ = ["DAggerConfig", "DAggerResult", "RoundData", "RoundEvent", "check_or_write_manifest",
           "check_teacher", "choose_teacher", "label_episodes", "load_round_policy", "make_env",
           "make_teacher", "policy_agreement", "route_alone", "run_dagger", "run_settings",
           "scenario_env", "start_episode", "trajectories_digest"]
