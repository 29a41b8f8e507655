"""Keeping secrets out of messages, logs and records: the one scrubber every module uses.

Why one module: error messages (:mod:`amft_lib.storage`), lineage records and registry tags
(:mod:`amft_lib.lineage`), CLI errors and run summaries all need the same rules, and two copies of
a scrubber drift apart. It imports nothing heavy, so any module (and the CLI boundary) can use it.

What :func:`redact_text` replaces with ``***``:
- the values of secret-looking environment variables (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, …)
  and any extra secrets the caller passes (e.g. the S3 secret key in use);
- credentials inside URLs, ``scheme://user:password@host`` → ``scheme://***@host`` (also when the
  password itself contains ``@``);
- signed-URL query parameters (``X-Amz-Signature``, ``X-Amz-Credential``, ``token``, …).

:func:`install_log_redaction` applies the same rules to every log record (for a program's entry
point: the CLI after ``logging.basicConfig``, `-v` included); :class:`RedactingStream` to printed
output that bypasses logging (kfp.local's task output); :func:`redacting_excepthook` to the
traceback of an uncaught exception.
"""

from __future__ import annotations

import io
import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REDACTED = "***"
# Environment variables whose names look like they hold a credential. Their values never appear in
# a message, record, tag or report (DESIGN.md "Security rules").
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_KEY|AUTH", re.IGNORECASE)
MIN_SECRET_LEN = 6  # shorter values ("1", "true") would redact ordinary text and protect nothing
# scheme://USERINFO@ — userinfo runs to the last "@" before the host's path, query or fragment.
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>]*@")
_SIGNED_QUERY = re.compile(
    r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token|access_token)=)[^&\s\"]+",
    re.IGNORECASE,
)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-looking environment variables, longest first (so a secret that contains
    another is replaced whole)."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if SECRET_NAME.search(k) and v and len(v) >= MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None, *, extra: Iterable[str] = ()) -> str:
    """`text` with secret values, URL credentials and signed-URL parameters replaced by ``***``.

    `secrets` replaces the environment scan (:func:`secret_values`); `extra` adds to it (any length:
    the caller knows these are secrets, e.g. the S3 secret key of the config in use).
    """
    values = set(secret_values() if secrets is None else secrets)
    values.update(s for s in extra if s)
    for secret in sorted(values, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    return _SIGNED_QUERY.sub(rf"\1{REDACTED}", text)


def redact(obj: Any, secrets: Sequence[str] | None = None) -> Any:
    """A copy of a JSON-like object with :func:`redact_text` applied to every string (keys too)."""
    secrets = secret_values() if secrets is None else list(secrets)
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, Mapping):
        return {redact_text(str(k), secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    return obj


def url_has_credentials(url: str) -> bool:
    """True if `url` carries ``user[:password]@`` before its host."""
    try:
        return "@" in urllib.parse.urlsplit(url).netloc
    except ValueError:
        return bool(_URL_USERINFO.search(url))


def safe_url(url: str | None) -> str:
    """`url` fit for a message: credentials and signed parameters replaced (``None`` → ``AWS``
    default endpoint, as boto3 reads it)."""
    return "AWS" if not url else redact_text(url, secrets=())


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message (and its traceback) through :func:`redact_text`.

    Install it on the root logger and its handlers at a program's entry point (the CLI's
    ``logging.basicConfig``), so a URL with credentials or a secret env value that reaches a log
    line from any library (botocore at DEBUG, MLflow, kfp) is scrubbed too. The environment is
    scanned at each record, not once: a secret set after start-up (the embedded S3 server's
    generated key, exported for the tasks of a local run) is scrubbed as well. `extra` adds secrets.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self._extra = {s for s in extra if s}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logging's problem; leave the record as it is
            return True
        secrets = {*secret_values(), *self._extra}
        clean = redact_text(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # the formatter reuses exc_text instead of re-formatting
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, secrets)
        return True


def install_log_redaction(logger: logging.Logger | None = None, extra: Iterable[str] = ()) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to `logger` (default: the root logger) and to each of its handlers.

    On the handlers it sees every record that propagates to them; on the logger itself it also
    covers records logged straight to it while someone swaps its handlers (kfp.local replaces the
    root logger's handlers while a pipeline runs, but keeps its filters). Idempotent.
    """
    target = logging.getLogger() if logger is None else logger
    flt = next((f for f in target.filters if isinstance(f, RedactingFilter)), None) or RedactingFilter(extra)
    if flt not in target.filters:
        target.addFilter(flt)
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt


class RedactingStream(io.TextIOBase):
    """A text stream that writes whole lines to `target` with :func:`redact_text` applied.

    For output that does not go through logging: kfp.local prints each task's streamed output and
    its executor input (the pipeline arguments, a tracking URI with its password among them) with
    ``print``. Lines are held until their newline so a secret split across two writes is still
    caught; :meth:`flush` writes a pending partial line.
    """

    def __init__(self, target: Any, extra: Iterable[str] = ()) -> None:
        self.target = target
        self._extra = {s for s in extra if s}
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        head, sep, self._pending = self._pending.rpartition("\n")
        if sep:
            self.target.write(redact_text(head + sep, {*secret_values(), *self._extra}))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.target.write(redact_text(self._pending, {*secret_values(), *self._extra}))
            self._pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.target, "isatty", lambda: False)())


def redacting_excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """A ``sys.excepthook`` that prints the traceback with :func:`redact_text` applied: a bug's
    traceback (or ``amft --debug``) can quote a URL with its password in an exception message."""
    import sys
    import traceback

    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))
