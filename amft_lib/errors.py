"""The one error type users see.

Why one base class: the CLI boundary (``amft_lib.cli.main``) turns every :class:`UserError` into a
single line ``error: <what>: <why>`` and exit status 2, and lets anything else surface as a bug
(traceback, exit 1). A library module raises a subclass of its own (``ConfigError``,
``DataError``, …) whose message names the file, row, field or parameter and the fix; it never
prints or exits itself.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad value, missing file, unreachable endpoint, refused resume).

    The message is one line, names what is wrong and where, and never holds a secret.
    """
