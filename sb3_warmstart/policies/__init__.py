"""Policies: replica-set and recurrent policies, the in-simulator policy router, policy files."""
