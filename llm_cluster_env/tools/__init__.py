"""Command-line tools over the env: compare routers, replay traces, evaluation helpers."""
