"""Helpers shared by the settings dataclasses (model, patches, training): dict round trips with key checks."""

from __future__ import annotations

from dataclasses import fields


def known_keys(cls: type, data: dict, what: str) -> dict:
    """A copy of ``data`` after checking that every key is a field of the dataclass ``cls``.

    Raises ValueError naming the unknown keys, e.g. "unknown model config keys ['bogus']".
    """
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}")
    return dict(data)
