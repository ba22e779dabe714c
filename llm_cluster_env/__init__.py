"""LLM-serving-cluster simulator and Gymnasium environment.

Importing the package registers ``LLMCluster-v0``::

    import gymnasium as gym
    import llm_cluster_env  # noqa: F401

    env = gym.make("LLMCluster-v0", scenario="a100x4_conv_70", episode_requests=2000)
"""

from gymnasium.envs.registration import register, registry

from llm_cluster_env.config import ConfigError, EnvConfig

ENV_ID = "LLMCluster-v0"
#: A new scenario from a family every episode (:mod:`llm_cluster_env.env.family`).
FAMILY_ENV_ID = "LLMClusterFamily-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="llm_cluster_env.env.cluster_env:LLMClusterEnv")
if FAMILY_ENV_ID not in registry:
    register(id=FAMILY_ENV_ID, entry_point="llm_cluster_env.env.family:ScenarioFamilyEnv")

__all__ = ["ENV_ID", "FAMILY_ENV_ID", "ConfigError", "EnvConfig"]
__version__ = "0.1.0"
