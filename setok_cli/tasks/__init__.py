"""Inference pipelines (library calls behind the CLI): tokenize, and later ask, generate, edit, segment."""
