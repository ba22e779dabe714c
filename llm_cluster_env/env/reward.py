"""Reward terms of ``LLMCluster-v0``.

Each step routes one request and advances the simulator to the next arrival. The reward of
that step is ``scale * (latency + ttft + slo + goodput + imbalance)`` with

* ``latency = -latency_weight * integral of (requests in the system) dt`` over the step, in
  request-seconds. Summed over an episode (the last step includes draining the cluster) this is
  exactly ``-latency_weight * sum of every request's end-to-end latency``: the return ranks
  routers by mean E2E latency, and each step is charged with the delay it actually caused.
* ``ttft = -ttft_weight * (sum of the TTFTs, in seconds, of the requests that finished in the
  step)``. Summed over an episode this is exactly ``-ttft_weight * sum of every request's
  TTFT``; charged when a request finishes, so the credit arrives later than the latency term's.
  With ``latency_weight`` it trades mean E2E against mean TTFT (what prefix-cache routing
  mostly moves).
* ``slo = -slo_violation_penalty * (requests finished in the step that missed the TTFT or TPOT
  target)``.
* ``goodput = +goodput_weight * (requests finished in the step that met both the TTFT and
  the TPOT target)``. Summed over an episode this is exactly ``goodput_weight * (requests that
  met the SLO)`` = ``goodput_weight * goodput_rps * makespan_s`` of the episode metrics (a
  one-token output needs only the TTFT target, as there).
* ``imbalance = -imbalance_penalty * (1 - balance)``, balance being ``1 - std`` of the
  dispatch shares over the recent window.

A request meets the SLO when ``TTFT <= ttft_s`` and ``TPOT <= tpot_s``, compared exactly as
:func:`llm_cluster_env.sim.metrics.episode_metrics` compares them, so the reward's count and
the metrics' ``slo_attainment`` / ``goodput_rps`` always agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_cluster_env.config import RewardConfig, SLOConfig
from llm_cluster_env.sim.metrics import balance_score
from llm_cluster_env.sim.request import Request

TERMS = ("latency", "ttft", "slo", "goodput", "imbalance")


class RewardFunction:
    """Computes the step reward and keeps per-term episode totals (``totals``).

    :param reward: term weights. :param slo: latency targets.
    """

    def __init__(self, reward: RewardConfig, slo: SLOConfig) -> None:
        self.config = reward
        self.ttft_s = slo.ttft_s
        self.tpot_s = slo.tpot_s
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(TERMS, 0.0)

    def meets_slo(self, req: Request) -> bool:
        """Whether a finished request met both targets (TPOT only for outputs of 2+ tokens)."""
        if req.first_token_time - req.arrival_time > self.ttft_s:
            return False
        return (req.output_tokens <= 1 or (req.finish_time - req.first_token_time)
                / (req.output_tokens - 1) <= self.tpot_s)

    def slo_violations(self, finished: Sequence[Request]) -> int:
        """How many of ``finished`` missed the TTFT or the TPOT target."""
        return len(finished) - self.slo_met(finished)

    def slo_met(self, finished: Sequence[Request]) -> int:
        """How many of ``finished`` met both the TTFT and the TPOT target."""
        return sum(map(self.meets_slo, finished))

    def __call__(self, request_seconds: float, finished: Sequence[Request],
                 dispatch_counts: Sequence[int]) -> float:
        """Reward for one step.

        :param request_seconds: integral of requests in the system over the step.
        :param finished: requests that finished during the step.
        :param dispatch_counts: recent dispatch counts per replica (for the imbalance term).
        """
        cfg = self.config
        latency = -cfg.latency_weight * request_seconds
        total = latency
        self.totals["latency"] += latency * cfg.scale
        if cfg.ttft_weight and finished:
            ttft = -cfg.ttft_weight * sum([r.first_token_time - r.arrival_time for r in finished])
            total += ttft
            self.totals["ttft"] += ttft * cfg.scale
        if cfg.slo_violation_penalty and finished:
            slo = -cfg.slo_violation_penalty * self.slo_violations(finished)
            total += slo
            self.totals["slo"] += slo * cfg.scale
        if cfg.goodput_weight and finished:
            goodput = cfg.goodput_weight * self.slo_met(finished)
            total += goodput
            self.totals["goodput"] += goodput * cfg.scale
        if cfg.imbalance_penalty:
            imbalance = -cfg.imbalance_penalty * (1.0 - balance_score(dispatch_counts))
            total += imbalance
            self.totals["imbalance"] += imbalance * cfg.scale
        return total * cfg.scale
