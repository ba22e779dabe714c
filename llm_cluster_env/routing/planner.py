"""The ``rollout_planner`` router: one step of policy iteration over ``least_added_time``.

At each decision the planner takes the ``candidates`` best replicas under the base rule
(``least_added_time``'s ``est_delta_s``) and, for each, simulates a copy of the *whole cluster*
forward: the pending request goes to the candidate, the requests arriving in the next
``horizon_s`` seconds are dispatched by the base rule, then the copy drains with no further
arrival. The cost of a candidate is the copy's time-integral of requests in system from the
decision until it is empty (request-seconds): the total time in system over the horizon plus the
drain term, which prices the work still in the system at the horizon by simulating it to the end.
With no arrival in the horizon and expected lengths (or true ones, clairvoyant) this is exactly
``lookahead``'s rule (the replicas not chosen drain identically in every branch and cancel; tested).

Futures (what the router cannot know) are sampled; ``samples`` futures per decision, averaged:

* arrivals in ``(now, now + horizon_s]`` and their lengths from the workload model
  (:class:`~llm_cluster_env.workload.generator.WorkloadGenerator`; exact for Poisson arrivals,
  a renewal from ``now`` for gamma ones);
* the output length of every request in the system (and of the pending one), from the
  workload's length sample conditioned on the tokens already generated (``O | O > g``;
  ``lengths="sampled"``), or ``lookahead``'s expected lengths (``lengths="expected"``).

Noise control — why the estimate is not noise (see ``docs/planner.md`` for the measurements):

1. **Common random numbers.** Future ``k`` of a decision is drawn from
   ``default_rng([seed, episode key, request id, k])`` once, before any branch, so every
   candidate sees the same arrivals and lengths; the difference between two candidates then
   contains only the effect of the choice.
2. **Shared assignment** (``assignment="shared"``, default). The base rule routes the sampled
   arrivals once, in the branch of the base's own choice, and every other branch replays that
   assignment. Re-routing in each branch (``assignment="reroute"``) makes each branch route every
   later arrival differently, and those diverging decisions dominate the difference (measured:
   spread 2.3-5x the mean difference, 1.0-1.4x shared). The price is a bias towards the base's
   choice, whose branch alone routes adaptively; ``assignment="cross"`` removes it by routing
   live in every branch and scoring each candidate by its mean over all those assignments
   (``candidates**2`` rollouts per future).
3. **Drain terminal.** The cost runs every branch to empty instead of cutting at the horizon, so
   work pushed past the horizon is paid for.
4. **Switch threshold** (``switch_t``, off by default): leave the base's choice only for a paired
   saving of at least that many standard errors over the futures.

**Objective** (``objective``; :func:`llm_cluster_env.tools.objectives.rollout_loss`): what a
rollout's cost counts, over every request the copy holds from the decision until it is empty:

* ``"mean_e2e"`` (default): request-seconds in system (the copy's ``area``), as above;
* ``"mean_ttft"``: request-seconds waiting for a first token, ``sum(max(0, first_token -
  max(arrival, now)))``: prefills that get ahead count, decodes that slow down do not;
* ``"ttft_e2e"``: the ``mean_ttft`` sum plus ``e2e_weight`` times the ``mean_e2e`` sum;
* ``"goodput"``: minus the requests meeting both SLO targets (``slo_ttft_s``/``slo_tpot_s``,
  the env's :class:`~llm_cluster_env.config.SLOConfig` unless given). A count is flat: where
  the candidates tie the base's choice stays.

``clairvoyant=True`` uses the episode's true future arrivals and every request's true output
length (one future; ``samples`` is not used): the bound of what better futures could give.
With ``clairvoyant_lengths=False`` it knows the arrivals (times and prompts) but estimates
every output length by ``lengths`` like the sampled planner: the part of the bound that
knowing the arrivals is worth.

A baseline, not a deployable design: it needs the whole simulator state, and costs
``candidates x samples`` cluster simulations per request (``benchmarks/planner.py`` reports
milliseconds per decision).

The router needs a workload model (sampled mode) or the episode (clairvoyant mode): call
:meth:`RolloutPlannerRouter.bind` with the env, or pass ``workload=`` / ``cluster=``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from heapq import heappush
from math import ceil, sqrt
from typing import TYPE_CHECKING

import numpy as np

from llm_cluster_env.env.observation import ClusterView
from llm_cluster_env.routing.base import Router
from llm_cluster_env.routing.engine_model import EngineModel
from llm_cluster_env.routing.lookahead import expected_length, settle_at_boundary
from llm_cluster_env.sim.cluster import Cluster
from llm_cluster_env.sim.events import BATCH_END, BATCH_START
from llm_cluster_env.sim.request import Request
from llm_cluster_env.tools.objectives import OBJECTIVES, is_finite_number, rollout_loss
from llm_cluster_env.validation import ConfigError

if TYPE_CHECKING:
    from llm_cluster_env.sim.replica import Replica
    from llm_cluster_env.workload.generator import WorkloadGenerator

#: Base rules the planner can run on cluster copies (the sampled arrivals are routed by it).
PLANNER_BASES = ("least_added_time",)
ASSIGNMENTS = ("shared", "reroute", "cross")
LENGTHS = ("sampled", "expected")
#: Sampled request ids start here (the episode's own ids are 0..n-1).
_SAMPLED_ID0 = 1 << 40


@dataclass(frozen=True)
class PlannerConfig:
    """Settings of :class:`RolloutPlannerRouter`.

    :param horizon_s: seconds of future arrivals simulated after the decision (> 0).
    :param samples: sampled futures per decision (>= 1), averaged; unused when clairvoyant.
    :param candidates: replicas tried, the best ones under the base rule (>= 1; 1 = the base).
    :param base: the base rule: ranks the candidates and routes the future arrivals in the
        copies (a router name; one of :data:`PLANNER_BASES`).
    :param assignment: ``"shared"`` (the base routes the sampled arrivals once, in its own
        choice's branch; the other branches replay that), ``"reroute"`` (every branch routes
        them itself) or ``"cross"`` (the base routes them in every candidate's branch; each
        candidate's cost is its mean over all those assignments: ``candidates**2`` rollouts).
    :param lengths: output lengths of the requests in the system, the pending one and the
        sampled ones: ``"sampled"`` from the workload's lengths given the tokens generated, or
        ``"expected"`` (``lookahead``'s: ``g + E[O - g | O > g]``, new ones ``E[O | prompt]``).
    :param clairvoyant: the episode's true future and true output lengths instead of samples.
    :param clairvoyant_lengths: with ``clairvoyant``: also the true output lengths (the
        default). ``False`` takes the true future arrivals (times and prompts) but estimates
        every output length by ``lengths``, as the sampled planner does (``"sampled"`` draws an
        arrival's output from the workload's output lengths, not conditioned on its prompt;
        ``"expected"`` takes ``E[O | prompt]``): the two halves of the clairvoyant bound, what
        the arrivals are worth and what the lengths are worth.
    :param switch_t: leave the base's choice only for a candidate whose mean saving over the
        futures is at least this many standard errors of the paired difference (>= 0; 0 = the
        least mean cost). A guard against acting on noise.
    :param seed: mixed into every decision's generator (with the episode key and request id).
    :param objective: what a rollout's cost counts (one of
        :data:`~llm_cluster_env.tools.objectives.OBJECTIVES`; see the module docstring).
    :param e2e_weight: ``objective="ttft_e2e"``: seconds of TTFT one request-second in system
        is worth (finite, >= 0; read by that objective only).
    :param slo_ttft_s: ``objective="goodput"``: the TTFT target (seconds, finite, > 0);
        ``None`` = the bound env's ``slo.ttft_s``.
    :param slo_tpot_s: ``objective="goodput"``: the TPOT target (seconds per token, finite,
        > 0); ``None`` = the bound env's ``slo.tpot_s``.
    """

    horizon_s: float = 3.0
    samples: int = 4
    candidates: int = 2
    base: str = "least_added_time"
    assignment: str = "shared"
    lengths: str = "sampled"
    clairvoyant: bool = False
    clairvoyant_lengths: bool = True
    switch_t: float = 0.0
    seed: int = 0
    objective: str = "mean_e2e"
    e2e_weight: float = 0.1
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, expectation: str) -> None:
            if not ok:
                raise ConfigError(f"planner.{key}={getattr(self, key)!r}: {expectation}")

        def is_int(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        need(isinstance(self.horizon_s, (int, float)) and not isinstance(self.horizon_s, bool)
             and self.horizon_s > 0 and np.isfinite(self.horizon_s), "horizon_s",
             "must be a finite number of seconds > 0")
        need(is_int(self.samples) and self.samples >= 1, "samples", "must be an integer >= 1")
        need(is_int(self.candidates) and self.candidates >= 1, "candidates",
             "must be an integer >= 1")
        from llm_cluster_env.routing.heuristics import ROUTERS  # lazy: heuristics may import us
        need(self.base in ROUTERS, "base", f"unknown router (known: {', '.join(ROUTERS)})")
        need(self.base in PLANNER_BASES, "base",
             f"the planner runs only {', '.join(PLANNER_BASES)} on cluster copies")
        need(self.assignment in ASSIGNMENTS, "assignment", f"must be one of {ASSIGNMENTS}")
        need(self.lengths in LENGTHS, "lengths", f"must be one of {LENGTHS}")
        need(isinstance(self.clairvoyant, bool), "clairvoyant", "must be True or False")
        need(isinstance(self.clairvoyant_lengths, bool), "clairvoyant_lengths",
             "must be True or False")
        need(isinstance(self.switch_t, (int, float)) and not isinstance(self.switch_t, bool)
             and self.switch_t >= 0 and np.isfinite(self.switch_t), "switch_t",
             "must be a finite number >= 0")
        need(is_int(self.seed) and self.seed >= 0, "seed", "must be an integer >= 0")
        need(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}")
        need(is_finite_number(self.e2e_weight) and self.e2e_weight >= 0, "e2e_weight",
             "must be a finite number >= 0 (seconds of TTFT per second in system)")
        for key in ("slo_ttft_s", "slo_tpot_s"):
            value = getattr(self, key)
            need(value is None or (is_finite_number(value) and value > 0), key,
                 "must be a finite number of seconds > 0, or None for the env's SLO")


@dataclass(frozen=True)
class PlanEstimate:
    """What the planner computed at one decision.

    :param candidates: replica indices tried, best first under the base rule.
    :param costs: ``(futures, candidates)`` rollout loss of the planner's objective from the
        decision until the copy is empty, per future and candidate (lower is better;
        request-seconds, or minus requests meeting the SLO for ``goodput``).
    :param base_scores: the base rule's score of every replica (seconds, ``est_delta_s``).
    """

    candidates: tuple[int, ...]
    costs: np.ndarray
    base_scores: np.ndarray

    @property
    def mean_costs(self) -> np.ndarray:
        return self.costs.mean(axis=0)

    @property
    def choice(self) -> int:
        """The candidate of least mean cost (on a tie the base rule's preference)."""
        return self.choose(0.0)

    def choose(self, switch_t: float) -> int:
        """The candidate of least mean cost among the base's choice and those whose paired
        saving against it is at least ``switch_t`` standard errors (over the futures)."""
        saving = self.costs[:, :1] - self.costs  # > 0: cheaper than the base's choice
        mean = saving.mean(axis=0)
        futures = self.costs.shape[0]
        stderr = saving.std(axis=0, ddof=1) / np.sqrt(futures) if futures > 1 else 0.0 * mean
        allowed = (mean > 0) & (mean >= switch_t * stderr)
        allowed[0] = True
        best = int(np.argmin(np.where(allowed, self.mean_costs, np.inf)))
        return self.candidates[best]


def fork_cluster(replicas: Sequence[Replica], now: float, arrivals: Sequence[Request],
                 ready_at: Sequence[float] | None = None) -> Cluster:
    """A :class:`~llm_cluster_env.sim.cluster.Cluster` over snapshots of ``replicas`` at the
    decision time ``now`` (seconds), whose future requests are ``arrivals`` (time-ordered, not
    dispatched). Each replica's live event is rebuilt from its state: the end of its batch in
    flight, or a batch start at ``ready_at[i]`` (``now`` if not given) for an idle replica with
    work or one whose batch was settled at a later boundary (``ready_at[i] > now``).
    ``in_system`` counts the requests on the replicas; ``area`` starts at 0.

    The replicas are the caller's (read, never modified). Reaches into the cluster's per-episode
    fields: a ``Cluster.fork`` in :mod:`llm_cluster_env.sim.cluster` would own this.
    """
    copies = [r.snapshot() for r in replicas]
    cluster = Cluster.__new__(Cluster)
    cluster.replicas = []
    cluster.check_invariants = False
    cluster.reset(arrivals)  # every per-episode field; no replica to empty yet
    cluster.replicas = copies
    cluster.now = now
    heap = cluster._heap
    in_system = 0
    for i, rep in enumerate(copies):
        in_system += len(rep.waiting) + len(rep.running)
        if rep.busy:
            heappush(heap, (rep.batch_end, BATCH_END, rep.id, rep.event_version))
        elif rep.has_work() or (ready_at is not None and ready_at[i] > now):
            # idle with work, or settled at a later boundary: the next batch starts at its
            # ready time, and a dispatch before it must not start one earlier
            rep.start_pending = True
            start = now if ready_at is None else ready_at[i]
            heappush(heap, (start, BATCH_START, rep.id, rep.event_version))
    cluster.in_system = in_system
    return cluster


class LengthSampler:
    """Output lengths (tokens) drawn from the workload's length sample.

    :param output_tokens: the sample's output lengths (>= 1).
    """

    def __init__(self, output_tokens: np.ndarray) -> None:
        self.sorted = np.sort(np.asarray(output_tokens, dtype=np.int64))
        if self.sorted.size == 0 or self.sorted[0] < 1:
            raise ValueError("LengthSampler: needs a non-empty sample of output lengths >= 1")
        self._values = self.sorted.tolist()

    def total(self, generated: int, rng: np.random.Generator) -> int:
        """An output length drawn from ``O | O > generated`` (``generated + 1`` when no sampled
        length exceeds it)."""
        values = self._values
        first = bisect_left(values, generated + 1)
        if first >= len(values):
            return generated + 1
        return values[first + int(rng.random() * (len(values) - first))]


def _fresh(req: Request) -> Request:
    """A not-yet-dispatched copy of ``req`` (its id, arrival, lengths and prompt chain)."""
    return Request(req.id, req.arrival_time, req.prompt_tokens, req.output_tokens, req.chain)


class RolloutPlannerRouter(Router):
    """Rollouts of the whole cluster over sampled futures (see the module docstring).

    :param config: the planner's settings (:class:`PlannerConfig`).
    :param workload: the workload model futures are sampled from (sampled mode).
    :param cluster: the env's cluster, whose ``requests`` are the episode (clairvoyant mode;
        read only).
    """

    name = "rollout_planner"
    requires_context = True

    def __init__(self, config: PlannerConfig | None = None, *,
                 workload: WorkloadGenerator | None = None, cluster: Cluster | None = None
                 ) -> None:
        self.config = config if config is not None else PlannerConfig()
        self.workload = workload
        self.cluster = cluster
        self._lengths: LengthSampler | None = None
        self._model: EngineModel | None = None
        self._episode_key = 0
        self._env_slo: tuple[float, float] | None = None

    def bind(self, env) -> RolloutPlannerRouter:
        """Take the workload model and the episode from ``env`` (an unwrapped
        :class:`~llm_cluster_env.env.cluster_env.LLMClusterEnv`); returns ``self``."""
        self.workload = env.workload
        self.cluster = env.cluster
        self._lengths = None
        slo = env.config.slo
        self._env_slo = (float(slo.ttft_s), float(slo.tpot_s))
        return self

    def slo_targets(self) -> tuple[float, float]:
        """The ``goodput`` objective's (TTFT seconds, TPOT seconds per token): the config's,
        else the bound env's."""
        cfg = self.config
        env = self._env_slo or (None, None)
        ttft = cfg.slo_ttft_s if cfg.slo_ttft_s is not None else env[0]
        tpot = cfg.slo_tpot_s if cfg.slo_tpot_s is not None else env[1]
        if ttft is None or tpot is None:
            raise ValueError("rollout_planner: objective='goodput' needs SLO targets: bind(env) "
                             "or set slo_ttft_s and slo_tpot_s")
        return ttft, tpot

    def rollout_cost(self, cluster: Cluster, now: float) -> float:
        """The objective's loss of a drained copy (lower is better; see the module docstring).
        ``mean_e2e`` is the copy's ``area`` exactly."""
        cfg = self.config
        if cfg.objective == "mean_e2e":
            return cluster.area
        slo = self.slo_targets() if cfg.objective == "goodput" else (None, None)
        return rollout_loss(cfg.objective, cluster.finished, now, area=cluster.area,
                            e2e_weight=cfg.e2e_weight, ttft_slo_s=slo[0], tpot_slo_s=slo[1])

    def reset(self, num_replicas: int, rng: np.random.Generator | None = None) -> None:
        super().reset(num_replicas, rng)
        self._episode_key = int(self.rng.integers(1 << 62))

    # ------------------------------------------------------------------ futures
    def _length_sampler(self) -> LengthSampler:
        if self._lengths is None:
            self._lengths = LengthSampler(self.workload.length_sample()[1])
        return self._lengths

    def sample_arrivals(self, now: float, rng: np.random.Generator) -> list[Request]:
        """Requests arriving in ``(now, now + horizon_s]`` drawn from the workload model."""
        workload = self.workload
        cfg = workload.config
        if cfg.arrival not in ("poisson", "gamma"):
            raise ValueError(f"workload.arrival={cfg.arrival!r}: rollout_planner samples futures "
                             "of poisson and gamma arrivals only; use clairvoyant=True")
        if cfg.prefix == "multiturn":
            raise ValueError("workload.prefix='multiturn': rollout_planner cannot sample futures "
                             "of multi-turn sessions; use clairvoyant=True")
        horizon = self.config.horizon_s
        expected = cfg.qps * horizon
        n = int(ceil(expected + 6.0 * sqrt(expected) + 10.0))
        while True:
            episode = workload.sample(n, rng)
            if len(episode) == 0 or episode.arrival_times[-1] > horizon:
                break
            n *= 2  # did not cover the horizon (vanishingly rare): draw a longer one
        times = episode.arrival_times.tolist()
        chains = episode.chains or (None,) * len(times)
        out = []
        for j, (t, p, o) in enumerate(zip(times, episode.prompt_tokens.tolist(),
                                          episode.output_tokens.tolist())):
            if t > horizon:
                break
            out.append(Request(_SAMPLED_ID0 + j, now + t, p, o, chains[j]))
        return out

    def true_arrivals(self, request: Request, now: float) -> list[Request]:
        """The episode's requests after ``request`` arriving by ``now + horizon_s``."""
        if self.cluster is None:
            raise ValueError("rollout_planner: clairvoyant=True needs the episode: bind(env) "
                             "or pass cluster=")
        end = now + self.config.horizon_s
        requests = self.cluster.requests  # the episode, in id (= arrival) order
        out = []
        i = request.id + 1
        while i < len(requests) and requests[i].arrival_time <= end:
            out.append(_fresh(requests[i]))
            i += 1
        return out

    # ------------------------------------------------------------------ base rule
    def _engine_model(self, prior) -> EngineModel:
        if self._model is None or self._model.prior is not prior:
            self._model = EngineModel(prior)
        return self._model

    @staticmethod
    def base_deltas(model: EngineModel, replicas: Sequence[Replica], request: Request,
                    now: float) -> list[np.float32]:
        """``est_delta_s`` of ``request`` on each of (copies of) ``replicas``, rounded to
        float32 as in the observation."""
        prompt, output = request.prompt_tokens, request.output_tokens
        return [np.float32(model.estimate(rep, now, prompt, output)[2]) for rep in replicas]

    @classmethod
    def base_choice(cls, model: EngineModel, replicas: Sequence[Replica], request: Request,
                    now: float) -> int:
        """``least_added_time`` on (copies of) replicas: least :meth:`base_deltas`, ties to
        the lowest index."""
        deltas = cls.base_deltas(model, replicas, request, now)
        return deltas.index(min(deltas))

    # ------------------------------------------------------------------ planning
    def _rollout(self, replicas, ready_at, now: float, pending: Request, candidate: int,
                 arrivals: Sequence[Request], assignment: list[int] | None, model: EngineModel
                 ) -> tuple[float, list[int]]:
        """The objective's loss from ``now`` until empty (:meth:`rollout_cost`) with
        ``pending`` on ``candidate`` and ``arrivals`` routed by ``assignment`` (or live by the
        base rule); returns it and the replicas the arrivals went to."""
        cluster = fork_cluster(replicas, now, [_fresh(a) for a in arrivals], ready_at)
        cluster.dispatch(_fresh(pending), candidate)
        chosen = []
        for j in range(len(arrivals)):
            req = cluster.next_arrival()
            target = (assignment[j] if assignment is not None
                      else self.base_choice(model, cluster.replicas, req, cluster.now))
            chosen.append(target)
            cluster.dispatch(req, target)
        cluster.drain()
        return self.rollout_cost(cluster, now), chosen

    def _future(self, context, k: int):
        """Future ``k``: (prepared replica copies, their ready times, the pending request with
        its length for this future, the arrivals)."""
        request, now = context.request, context.now
        cfg = self.config
        if cfg.clairvoyant and cfg.clairvoyant_lengths:
            return context.replicas, None, request, self.true_arrivals(request, now)
        if self.workload is None and (not cfg.clairvoyant or cfg.lengths == "sampled"):
            raise ValueError("rollout_planner: no workload model to sample futures from: "
                             "bind(env) or pass workload=")
        rng = np.random.default_rng([cfg.seed, self._episode_key, request.id, k])
        prior = context.output_prior
        if cfg.lengths == "sampled":
            lengths = self._length_sampler()

            def length_of(req, generated):
                return lengths.total(generated, rng)
        else:
            def length_of(req, generated):
                return expected_length(prior, req, generated)
        copies, ready = [], []
        for rep in context.replicas:
            twin = rep.snapshot()
            ready.append(settle_at_boundary(twin, now))
            if twin.has_work():
                twin.replace_output_lengths(length_of)
            copies.append(twin)
        pending = Request(request.id, request.arrival_time, request.prompt_tokens,
                          length_of(request, 0), request.chain)
        arrivals = (self.true_arrivals(request, now) if cfg.clairvoyant
                    else self.sample_arrivals(now, rng))
        if cfg.clairvoyant or cfg.lengths == "expected":  # sampled arrivals keep their draws
            for req in arrivals:
                req.output_tokens = length_of(req, 0)
        return copies, ready, pending, arrivals

    def futures_per_decision(self) -> int:
        """Futures averaged per decision: one when nothing is sampled (the true future with
        true or expected lengths), else ``samples``."""
        cfg = self.config
        if cfg.clairvoyant and (cfg.clairvoyant_lengths or cfg.lengths == "expected"):
            return 1
        return cfg.samples

    def base_scores(self, view: ClusterView) -> np.ndarray:
        """The base rule's per-replica scores (seconds): the observation's ``est_delta_s``, or
        the engine model's when the observation does not carry it."""
        if "est_delta_s" in view.layout.column:
            return np.asarray(view.column("est_delta_s"), dtype=np.float64)
        context = self.context(view)
        model = self._engine_model(context.output_prior)
        return np.array(self.base_deltas(model, context.replicas, context.request, context.now),
                        dtype=np.float64)

    def estimate(self, view: ClusterView) -> PlanEstimate:
        """Per-future, per-candidate costs at this decision (see :class:`PlanEstimate`)."""
        context = self.context(view)
        if context.request is None:
            raise ValueError("rollout_planner: no pending request to route")
        if context.output_prior is None:
            raise ValueError("rollout_planner: the routing context has no output-length prior")
        cfg = self.config
        if cfg.objective == "goodput":
            self.slo_targets()  # refused before any rollout when there are none
        scores = self.base_scores(view)
        order = np.argsort(scores, kind="stable")[: cfg.candidates]
        candidates = tuple(int(i) for i in order)
        futures = self.futures_per_decision()
        costs = np.zeros((futures, len(candidates)))
        if len(candidates) == 1:
            return PlanEstimate(candidates, costs, scores)
        model = self._engine_model(context.output_prior)
        mode = cfg.assignment
        for k in range(futures):
            replicas, ready, pending, arrivals = self._future(context, k)
            own = []  # per candidate: (cost with the arrivals routed live, their assignment)
            for m, candidate in enumerate(candidates):
                shared = own[0][1] if mode == "shared" and m > 0 else None
                own.append(self._rollout(replicas, ready, context.now, pending, candidate,
                                         arrivals, shared, model))
            if mode != "cross":
                costs[k] = [cost for cost, _ in own]
                continue
            for m, candidate in enumerate(candidates):
                total = own[m][0]
                for j, (_, assignment) in enumerate(own):
                    if j != m:
                        total += self._rollout(replicas, ready, context.now, pending,
                                               candidate, arrivals, assignment, model)[0]
                costs[k, m] = total / len(candidates)
        return PlanEstimate(candidates, costs, scores)

    def select(self, view: ClusterView) -> int:
        return self.estimate(view).choose(self.config.switch_t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class _ObjectivePlanner(RolloutPlannerRouter):
    """A :class:`RolloutPlannerRouter` registered under its objective's name: built without
    a config it takes :class:`PlannerConfig`'s defaults with ``objective`` set; a config with
    another objective is refused (``ConfigError``) so the name cannot lie."""

    objective = "mean_e2e"

    def __init__(self, config: PlannerConfig | None = None, **kwargs) -> None:
        if config is None:
            config = PlannerConfig(objective=self.objective)
        if config.objective != self.objective:
            raise ConfigError(f"planner.objective={config.objective!r}: router {self.name!r} "
                              f"plans for {self.objective!r}")
        super().__init__(config, **kwargs)


class TTFTPlannerRouter(_ObjectivePlanner):
    """``rollout_planner`` for ``objective="mean_ttft"``."""

    name = "rollout_planner_ttft"
    objective = "mean_ttft"


class TTFTE2EPlannerRouter(_ObjectivePlanner):
    """``rollout_planner`` for ``objective="ttft_e2e"`` (``e2e_weight`` from the config)."""

    name = "rollout_planner_ttft_e2e"
    objective = "ttft_e2e"


class GoodputPlannerRouter(_ObjectivePlanner):
    """``rollout_planner`` for ``objective="goodput"`` (SLO targets: the env's unless set)."""

    name = "rollout_planner_goodput"
    objective = "goodput"


#: The planner per objective, by router name (the registry's planner entries).
OBJECTIVE_PLANNERS = (RolloutPlannerRouter, TTFTPlannerRouter, TTFTE2EPlannerRouter,
                      GoodputPlannerRouter)


__all__ = ["ASSIGNMENTS", "GoodputPlannerRouter", "LENGTHS", "LengthSampler", "OBJECTIVE_PLANNERS",
           "PLANNER_BASES", "PlanEstimate", "PlannerConfig", "RolloutPlannerRouter",
           "TTFTE2EPlannerRouter", "TTFTPlannerRouter", "fork_cluster"]
