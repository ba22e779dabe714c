"""Every router by name, for the tools that take router names (``compare``, ``replay``).

:data:`~llm_cluster_env.routing.heuristics.ROUTERS` holds the heuristics and the look-ahead
baseline, what ``--routers all`` runs. :data:`PLANNERS` holds the costlier planners (tens of
milliseconds per decision: :mod:`llm_cluster_env.routing.planner`), one per objective, and the
look-ahead's objective variants, which a tool runs only when named.
"""

from __future__ import annotations

from types import MappingProxyType

from llm_cluster_env.routing.base import Router, build_router
from llm_cluster_env.routing.heuristics import ROUTERS
from llm_cluster_env.routing.lookahead import TTFTLookaheadRouter
from llm_cluster_env.routing.planner import OBJECTIVE_PLANNERS

#: The rollout planner per objective (``rollout_planner`` = mean E2E, ``rollout_planner_ttft``,
#: ``rollout_planner_ttft_e2e``, ``rollout_planner_goodput``) and the look-ahead's TTFT variant
#: (``lookahead_ttft``): named by a tool, never run by ``--routers all``.
PLANNERS: MappingProxyType[str, type[Router]] = MappingProxyType({
    **{cls.name: cls for cls in OBJECTIVE_PLANNERS},
    TTFTLookaheadRouter.name: TTFTLookaheadRouter,
})
#: Heuristics, baselines and planners.
ALL_ROUTERS: MappingProxyType[str, type[Router]] = MappingProxyType({**ROUTERS, **PLANNERS})


def make_any_router(name: str, **kwargs) -> Router:
    """A router of :data:`ALL_ROUTERS` by name; ``ValueError`` lists the names on a miss."""
    return build_router(ALL_ROUTERS, name, **kwargs)
