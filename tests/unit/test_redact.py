"""Secrets out of messages (issue 17): one scrubber for storage errors and lineage, URL credentials,
and which storage failures are the user's to fix (one ``error:`` line) versus bugs (traceback)."""

from __future__ import annotations

import logging

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from amft_lib import lineage, redact, storage
from amft_lib.errors import UserError

PASSWORD = "hunter2-Pa55word"


def test_lineage_and_storage_share_one_scrubber() -> None:
    assert lineage.redact_text is redact.redact_text
    assert lineage.redact is redact.redact
    assert lineage.secret_values is redact.secret_values
    assert lineage.REDACTED == redact.REDACTED == "***"
    assert storage.redact_text is redact.redact_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:hunter2-Pa55word@127.0.0.1:9000", "http://***@127.0.0.1:9000"),
        ("https://user:hunter2-Pa55word@s3.example.com/bucket/key", "https://***@s3.example.com/bucket/key"),
        # botocore quotes the URL in its messages
        (
            'Could not connect to the endpoint URL: "http://user:hunter2-Pa55word@h:1/b/k"',
            'Could not connect to the endpoint URL: "http://***@h:1/b/k"',
        ),
        # an "@" inside the password: all of the userinfo goes, not just up to the first "@"
        ("http://user:hunter2@Pa55word@h:9000/x", "http://***@h:9000/x"),
        ("postgresql://mlflow:hunter2-Pa55word@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        (
            "two: http://a:hunter2-Pa55word@h1 and s3://b/k and http://c:d@h2:1",
            "two: http://***@h1 and s3://b/k and http://***@h2:1",
        ),
        ("signed https://h/b/k?X-Amz-Signature=abc123&x=1", "signed https://h/b/k?X-Amz-Signature=***&x=1"),
        # left alone: URLs without credentials, e-mail addresses, "@" in a path
        ("http://127.0.0.1:8333/amft/runs/r1", "http://127.0.0.1:8333/amft/runs/r1"),
        ("mail ops@example.com about s3://amft/runs/x", "mail ops@example.com about s3://amft/runs/x"),
        ("https://h/models/m@champion", "https://h/models/m@champion"),
    ],
)
def test_redact_text_scrubs_url_credentials(text: str, expected: str) -> None:
    out = redact.redact_text(text, secrets=())
    assert out == expected
    assert PASSWORD not in out and "hunter2" not in out


def test_redact_text_env_secrets_and_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567890")
    monkeypatch.setenv("PLAIN_SETTING", "plainvalue123")
    text = "a tok-1234567890 b plainvalue123 c short1 d"
    assert redact.redact_text(text) == "a *** b plainvalue123 c short1 d"
    assert redact.redact_text(text, extra=["short1"]) == "a *** b plainvalue123 c *** d"  # extras of any length
    assert redact.safe_url("http://u:p@h:1") == "http://***@h:1" and redact.safe_url(None) == "AWS"


def test_endpoint_with_credentials_is_refused_without_echoing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://minio:{PASSWORD}@127.0.0.1:9000"
    with pytest.raises(storage.S3ConfigError) as info:
        storage.S3Config(endpoint_url=endpoint, access_key_id="AK", secret_access_key="SK-secret-1")
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert PASSWORD not in message and "minio" not in message
    assert "http://***@127.0.0.1:9000" in message and "AWS_SECRET_ACCESS_KEY" in message

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(storage.S3ConfigError) as from_env:
        storage.S3Config.from_env()
    assert PASSWORD not in str(from_env.value) and PASSWORD not in repr(from_env.value)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://h:21", "http://", "http://h:99999", "s3://bucket"])
def test_malformed_endpoint_is_a_user_error_naming_it(endpoint: str) -> None:
    with pytest.raises(storage.S3ConfigError, match="not an http\\(s\\) URL") as info:
        storage.S3Config(endpoint_url=endpoint)
    assert endpoint in str(info.value) and "\n" not in str(info.value)


def test_bad_retry_setting_is_a_user_error() -> None:
    with pytest.raises(storage.S3ConfigError, match="AWS_MAX_ATTEMPTS"):
        storage.S3Config.from_env({"AWS_MAX_ATTEMPTS": "many"})


CFG = storage.S3Config(endpoint_url="http://127.0.0.1:1", access_key_id="AKID", secret_access_key="TOPSECRET-value")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b"), "EndpointConnectionError"),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b"), "ReadTimeoutError"),
        (NoCredentialsError(), "NoCredentialsError"),
        (
            ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key id"}}, "GetObject"),
            "InvalidAccessKeyId",
        ),
        (
            ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "bad sig"}}, "GetObject"),
            "SignatureDoesNotMatch",
        ),
        (ClientError({"Error": {"Code": "403", "Message": ""}}, "HeadObject"), "AccessDenied"),
        (ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no bucket"}}, "GetObject"), "NoSuchBucket"),
        (SSLError(endpoint_url=f"https://u:{PASSWORD}@h:1", error="certificate verify failed"), "SSLError"),
    ],
)
def test_configuration_failures_are_user_errors_naming_the_endpoint(exc: Exception, code: str) -> None:
    err = storage._wrap(exc, op="read", uri="s3://b/k", config=CFG)
    assert isinstance(err, storage.StorageAccessError) and isinstance(err, UserError)
    text = str(err)
    assert err.code == code and "s3://b/k" in text and "\n" not in text
    assert "127.0.0.1:1" in text or "https://***@h:1" in text  # the endpoint, never its credentials
    assert "TOPSECRET-value" not in text and PASSWORD not in text


def test_missing_object_is_a_user_error_but_server_faults_and_corruption_are_not() -> None:
    missing = storage._wrap(
        ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"), op="read", uri="s3://b/k", config=CFG
    )
    assert isinstance(missing, storage.ObjectNotFoundError) and isinstance(missing, UserError)
    assert isinstance(missing, FileNotFoundError)

    broken = storage._wrap(
        ClientError({"Error": {"Code": "InternalError", "Message": "disk on fire"}}, "GetObject"),
        op="read",
        uri="s3://b/k",
        config=CFG,
    )
    cut = storage._wrap(ResponseStreamingError(error="reset"), op="read", uri="s3://b/k", config=CFG)
    for err in (broken, cut):
        assert type(err) is storage.StorageError and not isinstance(err, UserError)
    assert not issubclass(storage.IntegrityError, UserError)


def test_log_records_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_PASSWORD", "pw-from-env-123")
    logger = logging.getLogger("amft.test.redact")
    logger.propagate = False
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    logger.addHandler(handler)
    try:
        redact.install_log_redaction(logger)
        redact.install_log_redaction(logger)  # idempotent: one filter per handler
        assert len(handler.filters) == 1
        logger.warning("connecting to %s with %s", f"http://u:{PASSWORD}@h:1/x", "pw-from-env-123")
        logger.warning("nothing secret here: %d objects", 3)
    finally:
        logger.removeHandler(handler)
    assert records == ["connecting to http://***@h:1/x with ***", "nothing secret here: 3 objects"]
