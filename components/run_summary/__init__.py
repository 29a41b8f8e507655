"""The `run_summary` component (see component.py and README.md)."""

from components.run_summary.component import run_summary

__all__ = ["run_summary"]
