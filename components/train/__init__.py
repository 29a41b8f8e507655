"""The `train` component (see component.py and README.md)."""

from components.train.component import train

__all__ = ["train"]
