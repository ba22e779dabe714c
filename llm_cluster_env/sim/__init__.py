"""Discrete-event simulator of an LLM serving cluster (replicas with continuous batching)."""
