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
point: the CLI after ``logging.basicConfig``).
"""

from __future__ import annotations

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
    """A logging filter that passes every record's message through :func:`redact_text`.

    Install it on the handlers of the root logger at a program's entry point (the CLI's
    ``logging.basicConfig``), so a URL with credentials or a secret env value that reaches a log
    line from any library (botocore at DEBUG, MLflow, kfp) is scrubbed too. The environment is
    scanned when the filter is made; `extra` adds secrets to it.
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({*secret_values(), *(s for s in extra if s)}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logging's problem; leave the record as it is
            return True
        clean = redact_text(message, self._secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None, extra: Iterable[str] = ()) -> RedactingFilter:
    """Add one :class:`RedactingFilter` to every handler of `logger` (default: the root logger)."""
    target = logging.getLogger() if logger is None else logger
    flt = RedactingFilter(extra)
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
