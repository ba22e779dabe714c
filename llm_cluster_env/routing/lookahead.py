"""The ``lookahead`` router: simulate every replica to empty, with and without the request.

For each replica the router copies its state, runs the copy until it is empty (no further
arrivals) once as it is and once with the pending request added, and sends the request where
the total time in system of the replica's requests grows least:

    cost_i = sum(finish times with the request) - sum(finish times without it) - now

(the arrival times of the replica's other requests cancel; ``now`` is the new request's
arrival), which is the request's own end-to-end latency plus the delay it causes the others
there. Ties go to the lowest replica index.

``objective="mean_ttft"`` (``lookahead_ttft``) counts first tokens instead: the added
request-seconds waiting for a first token, the request's own TTFT plus the first-token delay it
causes the requests queued there (:func:`llm_cluster_env.tools.objectives.rollout_loss`);
``"ttft_e2e"`` adds ``e2e_weight`` times the E2E cost above. (``goodput`` is the planner's
only: one replica's count barely moves with one request.)

Output lengths are not known to a router: in the copies, a request that has produced ``g``
tokens gets ``g + E[O - g | O > g]`` (rounded) output tokens and a new one ``E[O | prompt]``,
from the workload's length distribution
(:class:`~llm_cluster_env.routing.engine_model.OutputLengthPrior`). With ``oracle=True`` the true
lengths are used, and a copy's drain is then exactly the simulator's own drain (tested to
1e-9 s).

It is a baseline, not a deployable design: it needs the replicas' full state (a real router
could approximate it from engine metrics) and costs a simulation per replica per request
(``benchmarks/router_latency.py`` reports microseconds per decision). Greedy: it ignores the
requests that will arrive later.
"""

from __future__ import annotations

import numpy as np

from llm_cluster_env.env.observation import ClusterView
from llm_cluster_env.routing.base import Router, _all_min
from llm_cluster_env.sim.request import Request, RequestState
from llm_cluster_env.tools.objectives import is_finite_number, rollout_loss
from llm_cluster_env.validation import require

#: Objectives the look-ahead scores (``goodput`` is left to the rollout planner).
LOOKAHEAD_OBJECTIVES = ("mean_e2e", "mean_ttft", "ttft_e2e")

_DECODING = RequestState.DECODING


def replica_copy(replica):
    """A what-if copy of a replica: its requests and bookkeeping copied, its configuration and
    iteration-time model shared (read-only); see ``Replica.snapshot``."""
    return replica.snapshot()


def settle_at_boundary(replica, now: float) -> float:
    """Finish the copy's batch in flight at its first iteration boundary after ``now`` (a
    pure-decode stretch is cut there, exactly as a dispatch at ``now`` would cut it); returns
    the time the copy next schedules (``now`` when idle). Requests finishing there finish."""
    if not replica.busy:
        return now
    if replica._batch_pure and replica.batch_iterations > 1:
        done = replica.iterations_done_by(now)
        boundary = replica.batch_start + replica._stretch_duration(done)
        keep = done if done and boundary == now else done + 1
        if keep < replica.batch_iterations:
            replica.batch_iterations = keep
            replica.batch_end = replica.batch_start + replica._stretch_duration(keep)
    end = replica.batch_end
    replica.end_batch(end)
    return end


def expected_length(prior, request, generated: int) -> int:
    """The output length (tokens) a copy gives ``request`` after ``generated`` tokens:
    ``g + E[O - g | O > g]`` (rounded, at least ``g + 1``), or ``E[O | prompt]`` (at least 1)
    for a request that has produced none (``prior``: an
    :class:`~llm_cluster_env.routing.engine_model.OutputLengthPrior`)."""
    return generated + max(1, round(prior.remaining(generated) if generated
                                    else prior.expected_output(request.prompt_tokens)))


def drain_finished(replica, start: float) -> list:
    """Run an idle-between-batches copy from ``start`` until it is empty; return the requests
    that finish, in finishing order."""
    out = []
    t = start
    while replica.has_work():
        end = replica.start_batch(t)
        if end is None:
            break
        t = end
        out.extend(replica.end_batch(t))
    return out


def drain_finish_times(replica, start: float) -> float:
    """Run an idle-between-batches copy from ``start`` until it is empty; return the sum of the
    finish times (seconds) of the requests that finish."""
    total = 0.0
    for req in drain_finished(replica, start):  # summed in finishing order, as before
        total += req.finish_time
    return total


class LookaheadRouter(Router):
    """Greedy look-ahead over copies of the replicas (see the module docstring).

    :param oracle: simulate with the requests' true output lengths instead of estimates.
    :param objective: ``"mean_e2e"`` (added time in system), ``"mean_ttft"`` (added
        request-seconds waiting for a first token) or ``"ttft_e2e"`` (the second plus
        ``e2e_weight`` times the first).
    :param e2e_weight: ``ttft_e2e``'s seconds of TTFT per second in system (finite, >= 0).
    """

    name = "lookahead"
    requires_context = True
    reads = ()  # simulates copies of the replicas instead
    default_objective = "mean_e2e"

    def __init__(self, oracle: bool = False, objective: str | None = None,
                 e2e_weight: float = 0.1) -> None:
        objective = self.default_objective if objective is None else objective
        require(objective in LOOKAHEAD_OBJECTIVES, "lookahead.objective", objective,
                f"must be one of {LOOKAHEAD_OBJECTIVES}")
        require(is_finite_number(e2e_weight) and e2e_weight >= 0, "lookahead.e2e_weight",
                e2e_weight, "must be a finite number >= 0 (seconds of TTFT per second in system)")
        self.oracle = oracle
        self.objective = objective
        self.e2e_weight = e2e_weight

    def costs(self, view: ClusterView) -> np.ndarray:
        """Added total time in system (seconds) of the pending request on each replica."""
        context = self.context(view)
        request = context.request
        if request is None:
            raise ValueError("lookahead: no pending request to route")
        prior = context.output_prior
        if not self.oracle and prior is None:
            raise ValueError("lookahead: the routing context has no output-length prior")
        now = context.now
        costs = np.empty(len(context.replicas))
        for i, replica in enumerate(context.replicas):
            base = replica_copy(replica)
            t0 = settle_at_boundary(base, now)
            if not self.oracle:
                base.replace_output_lengths(
                    lambda req, generated: expected_length(prior, req, generated))
            extra = Request(-1, now, request.prompt_tokens,
                            request.output_tokens if self.oracle
                            else expected_length(prior, request, 0),
                            chain=request.chain)  # its prompt's blocks: hits in the copy's cache
            with_request = replica_copy(base)
            with_request.enqueue(extra)
            if self.objective == "mean_e2e":  # the historical arithmetic, bit for bit
                without = drain_finish_times(base, t0)
                costs[i] = drain_finish_times(with_request, t0) - without - now
                continue
            costs[i] = self._loss(drain_finished(with_request, t0), now) \
                - self._loss(drain_finished(base, t0), now)
        return costs

    def _loss(self, finished: list, now: float) -> float:
        return rollout_loss(self.objective, finished, now, e2e_weight=self.e2e_weight)

    def select(self, view: ClusterView) -> int:
        return int(np.argmin(self.costs(view)))

    def tied_choices(self, view: ClusterView) -> np.ndarray:
        return _all_min(self.costs(view))


class TTFTLookaheadRouter(LookaheadRouter):
    """``lookahead`` scoring the added request-seconds waiting for a first token."""

    name = "lookahead_ttft"
    default_objective = "mean_ttft"


__all__ = ["LOOKAHEAD_OBJECTIVES", "LookaheadRouter", "TTFTLookaheadRouter", "drain_finished",
           "drain_finish_times", "expected_length", "replica_copy",
           "settle_at_boundary"]
