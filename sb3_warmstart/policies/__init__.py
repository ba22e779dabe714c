"""Policies: replica-set and recurrent policies, the in-simulator policy router, policy files."""


def __getattr__(name: str):
    """Classes that files saved before 2026-12-04 name as ``sb3_warmstart.policies.<Class>``
    (the module that is :mod:`sb3_warmstart.policies.recurrent` now): resolved lazily, so
    importing this package imports no torch code."""
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)

    recurrent = importlib.import_module("sb3_warmstart.policies.recurrent")
    try:
        return getattr(recurrent, name)
    except AttributeError:
        raise AttributeError(f"module 'sb3_warmstart.policies' has no attribute {name!r}") from None
