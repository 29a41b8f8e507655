"""The `prepare_data` component (see component.py and README.md)."""

from components.prepare_data.component import prepare_data

__all__ = ["prepare_data"]
