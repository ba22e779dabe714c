"""``LLMCluster-v0``: route each arriving request of an LLM serving cluster to a replica."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from llm_cluster_env.config import ConfigError, EnvConfig
from llm_cluster_env.env.observation import (
    ClusterView,
    ObservationBuilder,
    ObservationLayout,
    ReplicaFeatureGroup,
    RoutingContext,
    feature_groups,
)
from llm_cluster_env.env.reward import RewardFunction
from llm_cluster_env.routing.engine_model import OutputLengthPrior
from llm_cluster_env.sim.cluster import Cluster
from llm_cluster_env.sim.metrics import (
    RequestLatencies,
    RequestRecords,
    episode_metrics,
    prefix_cache_metrics,
)
from llm_cluster_env.sim.request import Request
from llm_cluster_env.workload import Workload, WorkloadGenerator


def check_render_mode(render_mode: str | None, env_id: str, supported: list[str]) -> None:
    """Refuse a ``render_mode`` the env does not support, naming it and the supported ones.

    A ``TypeError`` (as for an unexpected keyword), so that SB3's ``make_vec_env``, which
    first tries ``render_mode="rgb_array"``, retries without it."""
    if render_mode is not None and render_mode not in supported:
        raise TypeError(f"render_mode={render_mode!r}: {env_id} does not support it (supported: "
                        f"None, {', '.join(repr(m) for m in supported)})")


class LLMClusterEnv(gym.Env):
    """Request routing for a cluster of LLM replicas with continuous batching.

    ## Description
    A stream of inference requests (prompt and output lengths, arrival times) reaches a router
    in front of ``N`` model replicas. Each replica runs vLLM-style continuous batching over a
    paged KV cache, with iteration times calibrated on GPU kernel profiles (see
    :mod:`llm_cluster_env.sim`). At every arrival the agent picks the replica that serves the
    request; the simulator then runs until the next arrival.

    ## Action Space
    ``Discrete(N)``: the index of the replica that receives the pending request. With
    ``observation.replica_slots = S > N`` (padded layouts, and every ``LLMClusterFamily-v0``
    episode of a smaller cluster) it is ``Discrete(S)`` and the trailing ``S - N`` slots are
    empty: ``action_masks()`` (and ``info["action_mask"]``) is True for the first ``N``, as
    sb3-contrib's ``MaskablePPO`` expects. An action naming an empty slot ``k`` is not an error
    (environment checkers and unmasked learners sample every action of the space): the request
    goes to replica ``k % N`` and that step's ``info["invalid_action"]`` is True, with no other
    effect (no penalty). The info of every step of a padded env carries ``action_mask`` and
    ``invalid_action``; without empty slots every action is valid and only ``reset`` returns the
    mask. Actions outside ``[0, S)`` and non-integers are refused with a ``ValueError``.

    ## Observation Space
    ``Box(0, inf, (D,), float32)``; per-replica load (queued and running requests, KV usage,
    outstanding prefill and decode tokens, recent dispatch share, static speed and capacity),
    the pending request's prompt length, the recent arrival rate and optionally a window of
    recent decisions; when the replicas cache prefixes, per replica the pending prompt's
    estimated cached share, the router-side index fill and the cached share of the KV cache.
    ``env.unwrapped.layout.names`` lists all ``D`` features; the table is in
    :mod:`llm_cluster_env.env.observation`.

    ## Rewards
    By default minus the time-integral of the number of requests in the system over the step
    (request-seconds): an episode's return is minus the sum of all requests' end-to-end
    latencies. Optional SLO-violation and imbalance terms: :mod:`llm_cluster_env.env.reward`.

    ## Starting State
    An empty cluster at the first arrival of a workload drawn from ``np_random`` (or replayed
    from a trace). ``reset(options={"workload": w})`` serves the given
    :class:`~llm_cluster_env.workload.generator.Workload` instead, exactly as it is (arrival times,
    lengths, counters; ``episode_requests`` is ignored): that is how
    :mod:`llm_cluster_env.tools.replay` replays a request file.

    ## Episode End
    Terminates after ``episode_requests`` requests have been routed; the last step drains the
    cluster. Its ``info["metrics"]`` holds the episode statistics (latency percentiles,
    throughput, SLO attainment, utilisation, dispatch balance) and ``info["requests"]`` the
    per-request records as a ``column -> numpy array`` mapping (request id, arrival, lengths,
    replica, scheduling delay, TTFT, E2E, TPOT, preemptions; columns
    :data:`~llm_cluster_env.sim.metrics.REQUEST_COLUMNS`, the same as the replay CSV), a
    :class:`~llm_cluster_env.sim.metrics.RequestRecords` that vector envs keep whole; see
    :mod:`llm_cluster_env.sim.metrics`. Earlier steps return an empty ``info``.

    Truncated (``truncated=True``, ``terminated=False``) only with a step limit: after
    ``step_limit`` steps (an :class:`~llm_cluster_env.config.EnvConfig` field, ``None`` by
    default) when requests remain to be routed. The cluster is not drained, so the returned
    observation is the state the episode would have continued from (what a learner bootstraps
    its value on); ``info["metrics"]`` and ``info["requests"]`` cover the requests finished so
    far and ``info["requests_in_flight"]`` counts the routed ones still unfinished.
    ``env.spec.max_episode_steps`` reports the limit to wrappers and vector envs.
    ``gym.make("LLMCluster-v0", max_episode_steps=n)`` (gymnasium's ``TimeLimit``) truncates
    the same way, without those ``info`` entries. A vector env on gymnasium 1.x resets an
    ended sub-environment on its *next* step, which ignores the action and returns reward 0:
    mask that step (``docs/vector_envs.md``).

    ## Rendering
    ``render_mode="ansi"``: ``render()`` returns a text summary of the decision (time, pending
    request, per replica queued and running requests, KV usage and dispatches); ``"human"``
    prints it to stdout at every ``reset`` and ``step`` (and on ``render()``); ``None`` (default)
    renders nothing. Any other mode is refused at construction (a ``TypeError`` naming the mode
    and the supported ones).

    ## Arguments
    ``gym.make("LLMCluster-v0", scenario=None, **kwargs)``: ``scenario`` names a packaged
    scenario (or a YAML path) used as the base; every field of
    :class:`~llm_cluster_env.config.EnvConfig` is a keyword argument, nested configs as dicts.
    ``gym.make("LLMCluster-v0", config=env_config)`` takes an already built
    :class:`~llm_cluster_env.config.EnvConfig` instead (then no other setting may be given).
    ``shared_cache`` (a dict) shares read-only objects (iteration-time models, length samples
    and priors) between envs that are built often (a scenario family builds one per episode).
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}
    _spec = None

    @property
    def spec(self):
        """gymnasium's :class:`~gymnasium.envs.registration.EnvSpec` of this env, set by
        ``gym.make``; its ``max_episode_steps`` is the configured ``step_limit`` unless
        ``gym.make`` was given one."""
        return self._spec

    @spec.setter
    def spec(self, value) -> None:
        limit = self.config.step_limit if hasattr(self, "config") else None
        if value is not None and limit is not None and value.max_episode_steps is None:
            value = dataclasses.replace(value, max_episode_steps=limit)
        self._spec = value

    def __init__(self, scenario: str | None = None, render_mode: str | None = None, *,
                 config: EnvConfig | None = None, shared_cache: dict | None = None,
                 **kwargs: Any) -> None:
        check_render_mode(render_mode, "LLMCluster-v0", self.metadata["render_modes"])
        self.render_mode = render_mode
        if config is not None:
            if not isinstance(config, EnvConfig):
                raise TypeError(f"config: expected an EnvConfig, got {type(config).__name__}")
            if scenario is not None or kwargs:
                given = ["scenario"] * (scenario is not None) + sorted(kwargs)
                raise TypeError(f"config=EnvConfig(...) is the whole configuration: do not also "
                                f"pass {', '.join(given)}")
            self.config = config
        else:
            self.config = EnvConfig.from_kwargs(scenario=scenario, **kwargs)
        cfg = self.config
        self.cluster = Cluster.from_configs(
            cfg.replica_configs, jump=cfg.simulation_mode == "jump",
            check_invariants=cfg.check_invariants, latency_cache=shared_cache)
        self.num_replicas = len(self.cluster.replicas)
        servable = self.cluster.max_request_tokens
        max_total = cfg.workload.max_total_tokens or servable
        if max_total > servable:
            raise ConfigError(
                f"workload.max_total_tokens={max_total}: exceeds the {servable} tokens (prompt + "
                "output) that every replica can serve (context window and KV capacity); lower "
                "it, or leave it unset to use that limit")
        self.workload = WorkloadGenerator(cfg.workload, max_total, shared_cache)
        prior_key = ("output_prior", *self.workload.length_key)
        prior = shared_cache.get(prior_key) if shared_cache is not None else None
        if prior is None:
            prior = OutputLengthPrior.from_generator(self.workload)
            if shared_cache is not None:
                shared_cache[prior_key] = prior
        self.output_prior = prior
        groups = self._feature_groups()
        self.layout = ObservationLayout(self.num_replicas, cfg.observation,
                                        tuple(n for g in groups for n in g.names))
        self.builder = ObservationBuilder(self.layout, self.cluster.replicas,
                                          self.workload.mean_output_tokens, groups)
        self.reward_function = RewardFunction(cfg.reward, cfg.slo)
        self.action_space = spaces.Discrete(self.layout.num_slots)
        #: ``action_masks()``: True for the slots that hold a replica (read-only, shared).
        self._action_mask = np.arange(self.layout.num_slots) < self.num_replicas
        self._action_mask.flags.writeable = False
        self.observation_space = spaces.Box(0.0, np.inf, shape=(self.layout.size,),
                                            dtype=np.float32)
        self._pending: Request | None = None
        self._episode: Workload | None = None
        self._time_origin_s = 0.0
        self._obs = np.zeros(self.layout.size, dtype=np.float32)
        self.dispatch_counts = [0] * self.num_replicas
        self._steps = 0
        self._truncated = False

    def _feature_groups(self) -> list[ReplicaFeatureGroup]:
        """The optional per-replica feature groups this configuration switches on (the rule
        is :func:`~llm_cluster_env.env.observation.feature_groups`')."""
        return feature_groups(self.config.observation, self.cluster.replicas, self.output_prior)

    def observe_for(self, router: Any) -> None:
        """Compute from now on only the per-replica features ``router`` reads: its ``reads``
        (required: a feature this env's observation lacks is a ``ValueError`` naming the
        router and the feature) and ``reads_if_present``; a router without ``reads`` (an
        agent) gets the whole observation, as does ``observe_for(None)``. The features not
        read are NaN in the observations returned."""
        reads = getattr(router, "reads", None)
        if reads is None:
            self.builder.set_reads(None)
            return
        column = self.layout.column
        for feature in reads:
            if feature not in column:
                raise ValueError(
                    f"router {getattr(router, 'name', type(router).__name__)!r} reads the "
                    f"feature {feature!r}, which this env does not provide (per-replica "
                    f"features: {', '.join(self.layout.replica_features)}; see "
                    "observation.engine_signals and observation.prefix_features)")
        optional = [f for f in getattr(router, "reads_if_present", ()) if f in column]
        self.builder.set_reads(tuple(reads) + tuple(optional))

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options={"workload": Workload}`` serves that workload as given
        instead of drawing one (see Starting State)."""
        super().reset(seed=seed)
        episode = (options or {}).get("workload")
        if episode is None:
            episode = self.workload.sample(self.config.episode_requests, self.np_random)
        elif not isinstance(episode, Workload):
            raise TypeError(f"options['workload']: expected a Workload, got "
                            f"{type(episode).__name__}")
        if len(episode) == 0:
            raise ValueError("the episode has no request (all rejected by "
                             "oversize_policy='reject', or an empty options['workload'])")
        self._episode = episode
        # Simulate in times relative to a whole-second origin at or before the first arrival:
        # 0 for synthetic and replayed-from-zero workloads, and for a trace with absolute
        # timestamps (say 1e12 s) latencies keep full double precision instead of the
        # 2**-13 s steps of the timestamps' magnitude. Records add the origin back.
        origin = math.floor(episode.arrival_times[0])
        self._time_origin_s = float(origin)
        chains = episode.chains or (None,) * len(episode)
        requests = [
            Request(i, t - origin, p, o, c)
            for i, (t, p, o, c) in enumerate(zip(episode.arrival_times.tolist(),
                                                 episode.prompt_tokens.tolist(),
                                                 episode.output_tokens.tolist(), chains))
        ]
        self.cluster.reset(requests)
        self.builder.reset()
        self.reward_function.reset()
        self.dispatch_counts = [0] * self.num_replicas
        self._steps = 0
        self._truncated = False
        self._pending = self.cluster.next_arrival()
        self._obs = self._observe()
        if self.render_mode == "human":
            self.render()
        return self._obs, {"action_mask": self._action_mask}

    def step(self, action):
        request = self._pending
        if request is None or self._truncated:
            raise RuntimeError("step() called after the episode ended (or before reset())")
        slot = self._replica_index(action)
        # an empty slot (padded layouts only) falls back to replica slot % N (Action Space)
        replica = slot if slot < self.num_replicas else slot % self.num_replicas
        cluster = self.cluster
        area_before = cluster.area
        finished_before = len(cluster.finished)
        cluster.dispatch(request, replica)
        self.builder.record_dispatch(replica, request)
        self.dispatch_counts[replica] += 1
        self._steps += 1
        self._pending = cluster.next_arrival()
        terminated = self._pending is None
        limit = self.config.step_limit
        truncated = not terminated and limit is not None and self._steps >= limit
        if terminated:
            cluster.drain()
        reward = self.reward_function(
            cluster.area - area_before, cluster.finished[finished_before:],
            self.builder.recent_counts)
        self._obs = self._observe()
        info: dict[str, Any] = {}
        if self._action_mask.size > self.num_replicas:  # empty slots: the mask on every step
            info["action_mask"] = self._action_mask
            info["invalid_action"] = slot != replica
        if terminated or truncated:
            latencies = self._latencies()
            info["metrics"] = self._metrics(latencies)
            info["requests"] = latencies.columns(self.caches_prefixes)
        if truncated:
            self._truncated = True
            info["requests_in_flight"] = self._steps - len(latencies)
        if self.render_mode == "human":
            self.render()
        return self._obs, reward, terminated, truncated, info

    # ----------------------------------------------------------------- helpers
    def _replica_index(self, action: Any) -> int:
        """The slot index an action names: an integer (Python or NumPy, or an integer array
        holding one value) in ``[0, slots)``; anything else (floats, strings, booleans) is
        refused."""
        value = action
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(()).item() if np.issubdtype(value.dtype, np.integer) else value
        if isinstance(value, np.integer):
            value = int(value)
        slots = self._action_mask.size
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"action={action!r}: must be an integer replica index in "
                             f"[0, {slots - 1}], got {type(action).__name__}")
        if not 0 <= value < slots:
            raise ValueError(f"action={action!r}: must be a replica index in [0, {slots - 1}]")
        return value

    def action_masks(self) -> np.ndarray:
        """``(slots,)`` booleans, True for the slots that hold a replica (the first ``N``): the
        actions sb3-contrib's ``MaskablePPO`` may take. A read-only array, the same object on
        every call of an env (``info["action_mask"]`` is it too)."""
        return self._action_mask

    def render(self) -> str | None:
        """``render_mode="ansi"``: a text summary of the cluster at the current decision
        (time, pending request, per replica the queued and running requests, KV usage and
        dispatches so far); ``"human"``: the same text printed to stdout (``reset`` and
        ``step`` print it too, as Gymnasium's human mode does); ``None``: nothing."""
        if self.render_mode is None:
            return None
        text = self.render_text()
        if self.render_mode == "human":
            print(text, flush=True)
            return None
        return text

    def render_text(self) -> str:
        """The text :meth:`render` shows, whatever the ``render_mode``."""
        request = self._pending
        if self._episode is None:
            return f"{self.config.name}: {self.num_replicas} replicas, not reset yet"
        head = (f"{self.config.name}: t={self._time_origin_s + self.cluster.now:.3f} s, "
                f"step {self._steps}/{len(self._episode)}, ")
        if request is None:
            head += "episode ended"
        else:
            head += (f"pending request {request.id} (prompt {request.prompt_tokens}, "
                     f"output {request.output_tokens} tokens)")
        view = self.layout.view(self._obs)
        rows = [head, "replica  gpu          queued  running  kv_usage  dispatched"]
        for i, replica in enumerate(self.cluster.replicas):
            rows.append(f"{i:7d}  {replica.config.gpu:<11}  {view.queued[i]:6.0f}  "
                        f"{view.running[i]:7.0f}  {view.kv_usage[i]:8.1%}  "
                        f"{self.dispatch_counts[i]:10d}")
        return "\n".join(rows)

    def _observe(self) -> np.ndarray:
        request = self._pending
        if request is None:
            return self.builder.build(self.cluster.now, 0, 0)
        self.builder.record_arrival(request.arrival_time)
        return self.builder.build(self.cluster.now, request.prompt_tokens,
                                  request.output_tokens, request)

    @property
    def view(self) -> ClusterView:
        """Named view of the current observation with the routing context, for routers."""
        return self.layout.view(self._obs, self.routing_context())

    def routing_context(self) -> RoutingContext:
        """The pending request, the replicas (read-only) and the time of this decision."""
        return RoutingContext(self._pending, self.cluster.replicas, self.cluster.now,
                              self.output_prior)

    @property
    def caches_prefixes(self) -> bool:
        """Whether any replica caches prefixes (request records then carry the
        :data:`~llm_cluster_env.sim.metrics.PREFIX_REQUEST_COLUMNS` too)."""
        return any(r.cache is not None for r in self.cluster.replicas)

    @property
    def pending_request(self) -> Request | None:
        """The request the next action routes (``None`` once the episode has ended)."""
        return self._pending

    def request_records(self) -> RequestRecords:
        """Per-request records of the requests finished so far (the whole episode once it has
        ended) as ``column -> array``, columns
        :data:`~llm_cluster_env.sim.metrics.REQUEST_COLUMNS`, in request-id order."""
        return self._latencies().columns(self.caches_prefixes)

    def episode_metrics(self) -> dict[str, float]:
        """Statistics of the requests finished so far (the whole episode once it has ended)."""
        return self._metrics(self._latencies())

    def _latencies(self) -> RequestLatencies:
        return RequestLatencies.from_requests(self.cluster.requests, self._time_origin_s)

    def _metrics(self, latencies: RequestLatencies) -> dict[str, float]:
        cluster = self.cluster
        first_arrival = cluster.requests[0].arrival_time if cluster.requests else 0.0
        last_finish = latencies.finish_time.max() - self._time_origin_s if latencies.e2e.size else 0.0
        makespan = last_finish - first_arrival if latencies.e2e.size else 0.0
        metrics = episode_metrics(
            latencies,
            dispatch_counts=self.dispatch_counts,
            busy_time=[r.busy_time for r in cluster.replicas],
            batch_time=[r.batch_time for r in cluster.replicas],
            makespan_s=float(makespan),
            ttft_slo_s=self.config.slo.ttft_s,
            tpot_slo_s=self.config.slo.tpot_s,
            num_rejected=self._episode.num_rejected if self._episode else 0,
            num_clipped=self._episode.num_clipped if self._episode else 0,
        )
        for term, total in self.reward_function.totals.items():
            metrics[f"reward_{term}"] = total
        metrics["preemptions_total"] = float(sum(r.num_preemptions for r in cluster.replicas))
        if self.caches_prefixes:
            metrics.update(prefix_cache_metrics(latencies, cluster.replicas))
        return metrics
