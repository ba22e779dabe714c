"""Reward terms of ``LLMCluster-v0``.

Each step routes one request and advances the simulator to the next arrival. The reward of
that step is ``scale * (latency + ttft + slo + imbalance)`` with

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
* ``imbalance = -imbalance_penalty * (1 - balance)``, balance being ``1 - std`` of the
  dispatch shares over the recent window.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_cluster_env.config import RewardConfig, SLOConfig
from llm_cluster_env.sim.metrics import balance_score
from llm_cluster_env.sim.request import Request

TERMS = ("latency", "ttft", "slo", "imbalance")


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

    def slo_violations(self, finished: Sequence[Request]) -> int:
        """How many of ``finished`` missed the TTFT or the TPOT target."""
        bad = 0
        for req in finished:
            ttft = req.first_token_time - req.arrival_time
            tpot = ((req.finish_time - req.first_token_time) / (req.output_tokens - 1)
                    if req.output_tokens > 1 else 0.0)
            bad += ttft > self.ttft_s or tpot > self.tpot_s
        return bad

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
        if cfg.imbalance_penalty:
            imbalance = -cfg.imbalance_penalty * (1.0 - balance_score(dispatch_counts))
            total += imbalance
            self.totals["imbalance"] += imbalance * cfg.scale
        return total * cfg.scale
