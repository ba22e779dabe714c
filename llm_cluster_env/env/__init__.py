"""The Gymnasium environment: observation builder, reward, LLMClusterEnv, scenario families and
capacity measurement."""


def __getattr__(name: str):
    """``llm_cluster_env.env.LLMClusterEnv`` (the module path before 2026-12-04, which pickled
    environments in older checkpoints name): resolved lazily from
    :mod:`llm_cluster_env.env.cluster_env`."""
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)

    cluster_env = importlib.import_module("llm_cluster_env.env.cluster_env")
    try:
        return getattr(cluster_env, name)
    except AttributeError:
        raise AttributeError(f"module 'llm_cluster_env.env' has no attribute {name!r}") from None
