"""The `warm_start` component (see component.py and README.md)."""

from components.warm_start.component import warm_start

__all__ = ["warm_start"]
