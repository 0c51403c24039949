"""Range checks shared by the model configs (a config error names the class, the field and the value)."""

from __future__ import annotations


def require_at_least(config, names: tuple[str, ...], low: int) -> None:
    """ValueError unless every field in `names` of `config` is >= `low`."""
    for name in names:
        if getattr(config, name) < low:
            raise ValueError(f"{type(config).__name__}.{name} must be >= {low}, got {getattr(config, name)}")
