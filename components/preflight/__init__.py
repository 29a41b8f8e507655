"""The `preflight` component (see component.py and README.md)."""

from components.preflight.component import preflight

__all__ = ["preflight"]
