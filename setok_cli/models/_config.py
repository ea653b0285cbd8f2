"""Shared helper for the models' config dataclasses."""
from __future__ import annotations

from dataclasses import fields


def strict_from_dict(cls, d: dict):
    """cls(**d), but an unknown key is a ValueError naming it and the valid ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid: {sorted(names)}")
    return cls(**d)
