"""amft_lib.storage against a real SeaweedFS: round trips, multipart, integrity, auth and outages."""

from __future__ import annotations

import logging
import os

import boto3
import pytest
from botocore.config import Config

from amft_lib import storage
from amft_lib.s3server import EmbeddedS3, S3Settings

pytestmark = pytest.mark.s3

MiB = 1 << 20


def _boto(settings: S3Settings):
    """A plain boto3 client, to look at what storage.py wrote without going through it."""
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
        config=Config(s3={"addressing_style": "path"}),
    )


def test_round_trip_put_get_list_delete(s3: S3Settings, s3_prefix: str, tmp_path) -> None:
    a = storage.join(s3_prefix, "run", "a.txt")
    b = storage.join(s3_prefix, "run", "sub", "b.bin")
    storage.put_bytes(a, b"hello")
    storage.put_bytes(b, bytes(range(256)))
    # A sibling whose name extends the folder's: folder semantics must not pick it up.
    storage.put_bytes(storage.join(s3_prefix, "run-2", "c.txt"), b"other")

    assert storage.get_bytes(a, expected_sha256=storage.sha256_bytes(b"hello")) == b"hello"
    assert storage.get_bytes(b) == bytes(range(256))
    assert storage.exists(a) and not storage.exists(storage.join(s3_prefix, "run", "nope"))
    assert storage.list_prefix(storage.join(s3_prefix, "run")) == [a, b]

    copied = storage.download_prefix(storage.join(s3_prefix, "run"), tmp_path / "copy")
    assert copied == [str(tmp_path / "copy" / "a.txt"), str(tmp_path / "copy" / "sub" / "b.bin")]
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == bytes(range(256))

    storage.put_bytes(a, b"replaced")  # overwrite is a new whole object
    assert storage.get_bytes(a) == b"replaced"

    assert storage.delete_prefix(storage.join(s3_prefix, "run")) == 2
    assert storage.list_prefix(storage.join(s3_prefix, "run")) == []
    assert storage.list_prefix(storage.join(s3_prefix, "run-2")) == [storage.join(s3_prefix, "run-2", "c.txt")]
    storage.delete(a)  # deleting a missing object is not an error


def test_missing_object_is_not_found(s3: S3Settings, s3_prefix: str, tmp_path) -> None:
    missing = storage.join(s3_prefix, "missing")
    with pytest.raises(storage.ObjectNotFoundError) as info:
        storage.get_bytes(missing)
    assert isinstance(info.value, FileNotFoundError) and missing in str(info.value)
    with pytest.raises(storage.ObjectNotFoundError):
        storage.get_file(missing, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_multipart_upload_12mb_in_5mb_parts(s3: S3Settings, s3_prefix: str, tmp_path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    uri = storage.join(s3_prefix, "big.bin")

    storage.put_file(src, uri, chunk_size=5 * MiB, multipart_threshold=5 * MiB)

    bucket, key = storage.split_s3(uri)
    head = _boto(s3).head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == 12 * MiB
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB: a 3-part multipart upload
    dst = tmp_path / "out" / "big.bin"
    storage.get_file(uri, dst, expected_sha256=storage.sha256_file(src))
    assert dst.read_bytes() == src.read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["big.bin"]  # no temp file left behind
    # Ranged download in 5 MiB pieces, hashed in order while later ranges are still in flight.
    ranged = storage.S3Config.from_env(multipart_chunksize=5 * MiB, max_concurrency=3)
    dst.unlink()
    storage.get_file(uri, dst, expected_sha256=storage.sha256_file(src), config=ranged)
    assert dst.read_bytes() == src.read_bytes()


def test_empty_object_round_trip(s3: S3Settings, s3_prefix: str, tmp_path) -> None:
    uri = storage.join(s3_prefix, "empty")
    storage.put_bytes(uri, b"")
    storage.get_file(uri, tmp_path / "empty", expected_sha256=storage.sha256_bytes(b""))
    assert (tmp_path / "empty").read_bytes() == b"" and storage.get_bytes(uri) == b""


def test_sha256_mismatch_is_detected(s3: S3Settings, s3_prefix: str, tmp_path) -> None:
    uri = storage.join(s3_prefix, "obj")
    storage.put_bytes(uri, b"original")
    wrong = storage.sha256_bytes(b"something else")
    with pytest.raises(storage.IntegrityError, match="sha256 mismatch"):
        storage.get_bytes(uri, expected_sha256=wrong)
    with pytest.raises(storage.IntegrityError):
        storage.get_file(uri, tmp_path / "obj", expected_sha256=wrong)
    assert list(tmp_path.iterdir()) == []  # the mismatching download never lands


@pytest.mark.parametrize(
    ("field", "code"),
    [("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId"), ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch")],
)
def test_wrong_credentials_give_one_clear_error_without_the_secret(
    s3: S3Settings, s3_prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, field, code
) -> None:
    uri = storage.join(s3_prefix, "denied.txt")
    storage.put_bytes(uri, b"x")  # exists, so only the credentials can be wrong
    wrong_secret = "wrong-secret-Zq8xVb2mT"
    bad_value = "AKIAWRONGKEY000" if field == "AWS_ACCESS_KEY_ID" else wrong_secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    if field == "AWS_ACCESS_KEY_ID":
        monkeypatch.setenv(field, bad_value)
    caplog.set_level(logging.DEBUG)  # botocore logs every request at DEBUG: the secret must not be there

    errors = []
    for call in (
        lambda: storage.put_bytes(uri, b"y"),
        lambda: storage.get_bytes(uri),
        lambda: storage.exists(uri),  # must raise, not answer False
        lambda: storage.list_prefix(s3_prefix),
    ):
        with pytest.raises(storage.StorageError) as info:
            call()
        errors.append(info.value)

    for exc in errors:
        text = str(exc)
        assert exc.code == code, text
        assert uri in text or s3_prefix in text
        assert "\n" not in text
        assert exc.__cause__ is None and exc.__suppress_context__  # no botocore traceback chained on
        for secret in (wrong_secret, s3.secret_access_key):
            assert secret not in text and secret not in repr(exc)
    for secret in (wrong_secret, s3.secret_access_key):
        assert secret not in caplog.text
        assert secret not in repr(storage.S3Config.from_env()) and secret not in repr(s3)


def test_server_down_retries_then_fails_clearly_and_data_survives_restart(
    private_s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = private_s3.settings
    uri = settings.uri("persist", "blob.bin")
    payload = os.urandom(3 * MiB)
    storage.put_bytes(uri, payload)

    private_s3.stop()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    caplog.set_level(logging.DEBUG, logger="botocore.retries")
    with pytest.raises(storage.StorageError) as info:
        storage.put_bytes(settings.uri("persist", "other"), b"x")
    assert info.value.code == "EndpointConnectionError"
    assert "gave up after 3 attempts" in str(info.value) and settings.endpoint_url in str(info.value)
    retries = [r for r in caplog.records if "Retry needed" in r.getMessage()]
    assert len(retries) == 2  # 3 attempts = 1 + 2 retries with backoff

    private_s3.start()  # same data dir, ports and keys
    assert private_s3.settings.endpoint_url == settings.endpoint_url
    assert storage.get_bytes(uri, expected_sha256=storage.sha256_bytes(payload)) == payload
