"""Evaluation of `setok eval`: `metrics` (pure functions), `harness` (one function per
task reading SPEC data and prediction files) and `reconstruct` (a stage-1 checkpoint's
reconstructions, segments, clustering and retrieval)."""

__all__ = ["metrics", "harness", "reconstruct"]
