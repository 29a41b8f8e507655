"""The `stop_run` component (see component.py and README.md)."""

from components.stop_run.component import stop_run

__all__ = ["stop_run"]
