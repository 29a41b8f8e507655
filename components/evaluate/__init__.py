"""The `evaluate` component (see component.py and README.md)."""

from components.evaluate.component import evaluate

__all__ = ["evaluate"]
