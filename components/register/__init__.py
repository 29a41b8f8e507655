"""The `register` component (see component.py and README.md)."""

from components.register.component import register

__all__ = ["register"]
