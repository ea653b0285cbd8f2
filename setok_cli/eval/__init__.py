"""Evaluation harness of `setok eval`: `metrics` (pure functions) and `tasks` (one
function per task reading SPEC data and prediction files)."""

__all__ = ["metrics", "tasks"]
