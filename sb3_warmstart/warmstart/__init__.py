"""Warm start: heuristic demonstrations (plan, collect, store), behaviour cloning."""
