"""The `validate_data` component (see component.py and README.md)."""

from components.validate_data.component import validate_data

__all__ = ["validate_data"]
