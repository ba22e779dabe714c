"""Old module paths of classes pickled in files saved before the package layout of 2026-12-04.

SB3 model zips, checkpoints and pickled ``VecNormalize`` files name the classes they hold by
module path (``sb3_warmstart.set_policy.ReplicaSetPolicy``). When the modules moved into
subpackages (``sb3_warmstart.policies.replica_set``), such files would no longer load. This
module installs an import finder that answers an old path with the module now holding the same
code, so ``import sb3_warmstart`` is enough for ``PPO.load`` of an older run to work. New files
name the new paths; nothing else imports the old ones.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: Old module path -> the module that holds its code now.
MOVED_MODULES = {
    "llm_cluster_env.capacity": "llm_cluster_env.env.capacity",
    "llm_cluster_env.compare": "llm_cluster_env.tools.compare",
    "llm_cluster_env.engine_model": "llm_cluster_env.routing.engine_model",
    "llm_cluster_env.env": "llm_cluster_env.env.cluster_env",
    "llm_cluster_env.evaluation": "llm_cluster_env.tools.evaluation",
    "llm_cluster_env.family": "llm_cluster_env.env.family",
    "llm_cluster_env.feature_catalog": "llm_cluster_env.deploy.feature_catalog",
    "llm_cluster_env.lookahead": "llm_cluster_env.routing.lookahead",
    "llm_cluster_env.observation": "llm_cluster_env.env.observation",
    "llm_cluster_env.prefix_index": "llm_cluster_env.routing.prefix_index",
    "llm_cluster_env.prefix_workload": "llm_cluster_env.workload.prefix",
    "llm_cluster_env.replay": "llm_cluster_env.tools.replay",
    "llm_cluster_env.reward": "llm_cluster_env.env.reward",
    "llm_cluster_env.router_base": "llm_cluster_env.routing.base",
    "llm_cluster_env.router_runtime": "llm_cluster_env.deploy.router_runtime",
    "llm_cluster_env.routers": "llm_cluster_env.routing.heuristics",
    "llm_cluster_env.sim.hardware": "llm_cluster_env.hardware",
    "llm_cluster_env.vllm_router_adapter": "llm_cluster_env.deploy.vllm_router_adapter",
    "llm_cluster_env.workload": "llm_cluster_env.workload.generator",
    "sb3_warmstart.bc": "sb3_warmstart.warmstart.bc",
    "sb3_warmstart.callbacks": "sb3_warmstart.algorithms.callbacks",
    "sb3_warmstart.checkpoint": "sb3_warmstart.common.checkpoint",
    "sb3_warmstart.cloning": "sb3_warmstart.warmstart.cloning",
    "sb3_warmstart.config": "sb3_warmstart.pipeline.config",
    "sb3_warmstart.demos": "sb3_warmstart.warmstart.demo_collect",
    "sb3_warmstart.envs": "sb3_warmstart.pipeline.envs",
    "sb3_warmstart.export": "sb3_warmstart.export.graph",
    "sb3_warmstart.family_demos": "sb3_warmstart.warmstart.family_demos",
    "sb3_warmstart.kl": "sb3_warmstart.algorithms.kl",
    "sb3_warmstart.logs": "sb3_warmstart.pipeline.logs",
    "sb3_warmstart.normalize": "sb3_warmstart.common.normalize",
    "sb3_warmstart.pipeline": "sb3_warmstart.pipeline.runner",
    "sb3_warmstart.policies": "sb3_warmstart.policies.recurrent",
    "sb3_warmstart.policy_io": "sb3_warmstart.policies.policy_file",
    "sb3_warmstart.ppo": "sb3_warmstart.algorithms.ppo",
    "sb3_warmstart.ppo_stage": "sb3_warmstart.pipeline.ppo_stage",
    "sb3_warmstart.progress": "sb3_warmstart.pipeline.progress",
    "sb3_warmstart.recurrent_buffers": "sb3_warmstart.algorithms.recurrent_buffers",
    "sb3_warmstart.report": "sb3_warmstart.pipeline.report",
    "sb3_warmstart.router": "sb3_warmstart.policies.router",
    "sb3_warmstart.run_folder": "sb3_warmstart.pipeline.run_folder",
    "sb3_warmstart.schedules": "sb3_warmstart.algorithms.schedules",
    "sb3_warmstart.set_policy": "sb3_warmstart.policies.replica_set",
    "sb3_warmstart.warm_start_stage": "sb3_warmstart.pipeline.warm_start_stage",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is already executed
        return None


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old paths in :data:`MOVED_MODULES` (only those that are no longer modules
    or packages of their own: ``sb3_warmstart.policies`` and ``llm_cluster_env.env`` are
    packages now, so pickles naming a class directly under them are served by the package's
    attribute lookup instead; see :func:`install`)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED_MODULES.get(fullname)
        if new is None or fullname in _NOW_PACKAGES:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(new))


#: Old module paths that are packages now: their classes are re-exported lazily instead.
_NOW_PACKAGES = frozenset({"sb3_warmstart.policies", "sb3_warmstart.pipeline", "sb3_warmstart.export",
                           "llm_cluster_env.env", "llm_cluster_env.workload"})


def install() -> None:
    """Install the finder once (idempotent)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
