"""One storage API over ``s3://bucket/key`` URIs and local paths.

Why one API: every stage writes its outputs to a run root that is a local folder on a laptop and
``s3://BUCKET/PREFIX/runs/RUN_ID`` on a cluster (DESIGN.md, "S3 layout"). Stages call these
functions and never branch on where the root lives.

Semantics the callers rely on:
- **Atomic writes.** A reader sees the old object or the whole new one, never a prefix of it.
  Local writes go to a hidden temp name in the same folder, are fsync'ed, then ``os.replace``'d;
  an S3 PUT (single or multipart) only becomes visible when it completes.
- **Verified downloads cost no extra pass.** ``get_file`` fetches S3 objects with parallel ranged
  GETs pinned to one ETag and hashes the file front to back while later ranges are in flight.
- **Prefixes are folders.** ``list_prefix`` / ``delete_prefix`` treat the URI as a folder (a trailing
  ``/`` is implied), so ``…/step-1`` never matches ``…/step-10``; this matches the local meaning.
- **Errors are one line.** Every botocore/boto3 failure becomes a :class:`StorageError` whose message
  names the operation, the URI and the cause code (``InvalidAccessKeyId``, ``EndpointConnectionError``,
  …). Secrets never appear in messages, reprs or logs: :class:`S3Config` hides them from ``repr``,
  refuses endpoints with ``user:password@`` in them, and messages go through
  :func:`amft_lib.redact.redact_text` (the config's secrets, secret-looking env values, URL
  credentials) before raising.
- **User error or bug.** Failures the user fixes in their settings are :class:`~amft_lib.errors.UserError`
  subclasses (one ``error:`` line, exit 2 at the CLI): :class:`S3ConfigError` (a bad value, found
  before any request), :class:`StorageAccessError` (endpoint unreachable or invalid, credentials
  missing/wrong/expired, access denied, no such bucket, wrong region; the message names the
  endpoint) and :class:`ObjectNotFoundError` (the URI names nothing). Server faults that survive the
  retries (5xx, a transfer cut mid-way), malformed requests and :class:`IntegrityError` (the bytes
  are not the ones recorded: corruption or a writer's bug) stay plain :class:`StorageError`: a
  traceback is what helps there.

Connection settings come from the standard environment (see :meth:`S3Config.from_env`); the boto3
client is built once per distinct :class:`S3Config` and cached (boto3 clients are thread-safe).
boto3 is imported lazily so ``amft --help`` stays fast (STYLE.md §2.12).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from amft_lib.errors import UserError
from amft_lib.redact import redact_text, safe_url, url_has_credentials

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_FILE_SCHEME = "file://"
_MiB = 1 << 20
# S3 rejects multipart parts under 5 MiB (except the last one).
_MIN_PART_SIZE = 5 * _MiB
# Hidden temp names used by local atomic writes; listings skip them.
_TMP_MARK = ".tmp-"


# ── errors ──────────────────────────────────────────────────────────────────────────────────────


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the URI and the cause.

    Attributes:
        uri: the URI the operation was about.
        code: a short cause code: the S3 error code (``InvalidAccessKeyId``, ``NoSuchBucket``, …),
            the botocore exception class (``EndpointConnectionError``) or ``IntegrityError``.
    """

    def __init__(self, message: str, *, uri: str, code: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        self.code = code


class StorageAccessError(StorageError, UserError):
    """The store cannot be used with these settings: endpoint unreachable or invalid, credentials
    missing or wrong, access denied, bucket missing, wrong region. The message names the endpoint
    (without credentials); the user fixes it in the environment, not in the code."""


class ObjectNotFoundError(StorageError, FileNotFoundError, UserError):
    """The object (or local file) does not exist. Also a FileNotFoundError, so callers that only
    know local files keep working. A user error: the URI came from the user (``--resume``, data
    and model locations) or names a run they pointed at."""


class S3ConfigError(UserError, ValueError):
    """An S3 setting (usually from the ``AWS_*`` environment) is invalid; found before any request.
    Also a ValueError, as these checks always raised."""


class IntegrityError(StorageError):
    """The bytes read do not have the sha256 the caller expected (truncated or altered object)."""


# ── connection settings ─────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class S3Config:
    """How to reach S3. Secrets are excluded from ``repr`` so the config can be logged.

    Build it with :meth:`from_env` unless a test needs explicit values.
    """

    endpoint_url: str | None = field(
        default=None, metadata={"help": "S3 endpoint (http://127.0.0.1:8333 for SeaweedFS); None = AWS."}
    )
    region: str = field(default="us-east-1", metadata={"help": "Signing region."})
    access_key_id: str | None = field(
        default=None, metadata={"help": "None = boto3's default credential chain (IRSA, profile, …)."}
    )
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = field(
        default=5,
        metadata={"help": "Total tries per request (botocore 'standard' retries, exponential backoff)."},
    )
    retry_mode: str = field(default="standard", metadata={"help": "botocore retry mode."})
    connect_timeout: float = field(default=5.0, metadata={"help": "Seconds to open a connection."})
    read_timeout: float = field(default=60.0, metadata={"help": "Seconds to wait for a response chunk."})
    multipart_threshold: int = field(
        default=64 * _MiB, metadata={"help": "Bytes from which put_file uploads in parallel parts."}
    )
    multipart_chunksize: int = field(
        default=32 * _MiB,
        metadata={
            "help": "Part / range size in bytes (>= 5 MiB). 32 MiB x 4 beat boto3's 8 MiB x 10 against "
            "SeaweedFS on 2 cores (bench/bench_checkpoint.py); env AMFT_S3_CHUNK_MB."
        },
    )
    max_concurrency: int = field(
        default=4, metadata={"help": "Parallel parts/ranges per file; env AMFT_S3_CONCURRENCY."}
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise S3ConfigError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_concurrency < 1:
            raise S3ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.multipart_chunksize < _MIN_PART_SIZE:
            raise S3ConfigError(
                f"multipart_chunksize must be >= 5 MiB (S3's minimum part size), got {self.multipart_chunksize}"
            )
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise S3ConfigError("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither")
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> S3Config:
        """Read the standard AWS variables (the same ones boto3, MLflow and KFP use).

        Endpoint: ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then ``MLFLOW_S3_ENDPOINT_URL``
        (so an MLflow-configured shell works unchanged). Region: ``AWS_REGION``, then
        ``AWS_DEFAULT_REGION``. Retries: ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``. Transfer tuning:
        ``AMFT_S3_CHUNK_MB``, ``AMFT_S3_CONCURRENCY``.
        """
        env = os.environ if environ is None else environ

        def first(*names: str) -> str | None:
            for name in names:
                value = env.get(name)
                if value:
                    return value
            return None

        values: dict[str, Any] = {
            "endpoint_url": first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
            "region": first("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
            "access_key_id": first("AWS_ACCESS_KEY_ID"),
            "secret_access_key": first("AWS_SECRET_ACCESS_KEY"),
            "session_token": first("AWS_SESSION_TOKEN"),
            "retry_mode": first("AWS_RETRY_MODE") or "standard",
        }
        for name, key, scale in (
            ("AWS_MAX_ATTEMPTS", "max_attempts", 1),
            ("AMFT_S3_CHUNK_MB", "multipart_chunksize", _MiB),
            ("AMFT_S3_CONCURRENCY", "max_concurrency", 1),
        ):
            raw = first(name)
            if raw is not None:
                try:
                    values[key] = int(raw) * scale
                except ValueError:
                    raise S3ConfigError(f"{name} must be an integer, got {raw!r}") from None
        values.update(overrides)
        return cls(**values)

    def secrets(self) -> tuple[str, ...]:
        """The strings that must never leave the process (used to scrub error messages)."""
        return tuple(s for s in (self.secret_access_key, self.session_token) if s)


def _check_endpoint(url: str) -> None:
    """An endpoint must be ``http(s)://host[:port][/path]``. Credentials in it are refused: S3 signs
    requests with the access key and secret, a ``user:password@`` there is a misplaced secret that
    botocore would carry into every error message and log line."""
    import urllib.parse

    shown = safe_url(url)
    hint = "e.g. http://127.0.0.1:8333; set AWS_ENDPOINT_URL_S3"
    if url_has_credentials(url):
        raise S3ConfigError(
            f"S3 endpoint {shown} must not contain a user name or password: give the keys in "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise S3ConfigError(f"S3 endpoint {shown!r} is not an http(s) URL with a host and valid port ({hint})")


def _config(config: S3Config | None) -> S3Config:
    return S3Config.from_env() if config is None else config


@functools.lru_cache(maxsize=16)
def _client(config: S3Config) -> Any:
    """One boto3 S3 client per distinct config: path-style addressing (SeaweedFS, MinIO), standard
    retries with backoff. Cached because building a client costs ~50 ms and a training run makes
    thousands of calls."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        aws_session_token=config.session_token,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": config.retry_mode, "total_max_attempts": config.max_attempts},
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_pool_connections=max(16, 4 * config.max_concurrency),  # 3 files x ranges in flight
        ),
    )


def _transfer_config(config: S3Config, threshold: int | None, chunk_size: int | None) -> Any:
    from boto3.s3.transfer import TransferConfig

    chunk = config.multipart_chunksize if chunk_size is None else chunk_size
    if chunk < _MIN_PART_SIZE:
        raise ValueError(f"chunk_size must be >= 5 MiB (S3's minimum part size), got {chunk}")
    return TransferConfig(
        multipart_threshold=config.multipart_threshold if threshold is None else threshold,
        multipart_chunksize=chunk,
        max_concurrency=config.max_concurrency,
        use_threads=True,
    )


# ── error translation ───────────────────────────────────────────────────────────────────────────


def _boto_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CONNECTION_ERRORS = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionError",
    "ProxyConnectionError",
}


def _cause(exc: BaseException, config: S3Config) -> tuple[str, str]:
    """(code, one-line detail) for a boto3/botocore exception, unwrapping boto3's wrappers."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
        # boto3 re-raises a part's ClientError as S3UploadFailedError with the original as context.
        return _cause(exc.__context__, config)
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return _cause(exc.last_exception, config)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "ClientError")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "403":
            # HEAD responses carry no body, so S3 cannot say why; name the usual causes.
            return "AccessDenied", "HTTP 403 (wrong access key/secret, or no permission on this bucket)"
        if code in _NOT_FOUND_CODES:
            return code, "no such object"
        message = str(error.get("Message") or "").strip() or f"HTTP {status}"
        return code, message
    if isinstance(exc, NoCredentialsError):
        return "NoCredentialsError", "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    code = type(exc).__name__
    endpoint = safe_url(config.endpoint_url)
    if code in _CONNECTION_ERRORS:
        return code, f"cannot reach {endpoint} (gave up after {config.max_attempts} attempts)"
    if code in {"ResponseStreamingError", "IncompleteReadError"}:
        return code, f"connection to {endpoint} broke off mid-transfer (gave up after {config.max_attempts} attempts)"
    return code, str(exc)


# Causes the user fixes in their settings (StorageAccessError): where the store is, who they are,
# which bucket and region. Connection failures count: the endpoint is wrong or the server is down.
_ACCESS_CODES = _CONNECTION_ERRORS | {
    "EndpointResolutionError",
    "SSLError",
    "NoCredentialsError",
    "PartialCredentialsError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "NoSuchBucket",
    "InvalidBucketName",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
}


def _scrub(text: str, config: S3Config) -> str:
    """One line without the config's secrets, secret-looking env values or URL credentials."""
    return " ".join(redact_text(text, extra=config.secrets()).split())  # one line, whatever the server sent


def _wrap(exc: BaseException, *, op: str, uri: str, config: S3Config) -> StorageError:
    code, detail = _cause(exc, config)
    message = f"{op} {uri} failed: {code}: {detail}"
    cls: type[StorageError] = StorageError
    if code in _NOT_FOUND_CODES:
        cls = ObjectNotFoundError
    elif code in _ACCESS_CODES:
        cls = StorageAccessError
        endpoint = safe_url(config.endpoint_url)
        if endpoint not in detail:
            message += f" (endpoint {endpoint})"
    return cls(_scrub(message, config), uri=uri, code=code)


# ── URIs ────────────────────────────────────────────────────────────────────────────────────────


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://…`` URIs; everything else is a local path (``file://`` prefix allowed)."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _local(uri: str | os.PathLike[str]) -> str:
    path = os.fspath(uri)
    return path[len(_FILE_SCHEME) :] if path.startswith(_FILE_SCHEME) else path


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URI or local path.

    Parts are split on ``/`` and empty segments dropped, so ``join(root, "/x")`` stays under root
    (unlike ``os.path.join``) and the S3 key and the local path name the same thing. ``.`` and ``..``
    segments are refused: on S3 they are literal key names, locally they would leave the root.
    """
    clean = [seg for p in parts for seg in p.split("/") if seg]
    if any(seg in (".", "..") for seg in clean):
        raise ValueError(f"'.' or '..' path segment in {parts!r}")
    if is_s3(uri):
        base = str(uri).rstrip("/")
        return "/".join([base, *clean]) if clean else base
    return os.path.join(_local(uri), *clean)


def _folder_key(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


# ── hashing ─────────────────────────────────────────────────────────────────────────────────────


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, streamed (checkpoints are hundreds of MB)."""
    with open(_local(path), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_sha(actual: str, expected: str | None, uri: str) -> None:
    if expected is not None and actual != expected.lower():
        raise IntegrityError(
            f"sha256 mismatch for {uri}: expected {expected.lower()}, got {actual} (truncated or altered)",
            uri=uri,
            code="IntegrityError",
        )


# ── local atomic writes ─────────────────────────────────────────────────────────────────────────


def _atomic_local_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a hidden temp file in the same folder, fsync, then rename over ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    # Make the rename itself durable; best effort (not every filesystem allows a dir fsync).
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and _TMP_MARK in name


# ── the API ─────────────────────────────────────────────────────────────────────────────────────


def ensure_bucket(bucket: str, *, config: S3Config | None = None) -> None:
    """Create ``bucket`` if it does not exist (the embedded server and tests need this)."""
    cfg = _config(config)
    client = _client(cfg)
    uri = f"{S3_SCHEME}{bucket}"
    try:
        client.create_bucket(Bucket=bucket)
    except _boto_errors() as exc:
        code, _ = _cause(exc, cfg)
        if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            return
        raise _wrap(exc, op="create bucket", uri=uri, config=cfg) from None


def put_bytes(uri: str, data: bytes, *, config: S3Config | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (single PUT on S3; temp + rename locally)."""
    if not is_s3(uri):
        _atomic_local_write(_local(uri), lambda f: f.write(data))
        return
    cfg = _config(config)
    bucket, key = split_s3(uri)
    logger.debug("put %s (%d bytes)", uri, len(data))
    try:
        _client(cfg).put_object(Bucket=bucket, Key=key, Body=data)
    except _boto_errors() as exc:
        raise _wrap(exc, op="write", uri=uri, config=cfg) from None


def put_file(
    local_path: str | os.PathLike[str],
    uri: str,
    *,
    chunk_size: int | None = None,
    multipart_threshold: int | None = None,
    config: S3Config | None = None,
) -> None:
    """Copy a local file to ``uri``. On S3, files at or above the threshold go up as a parallel
    multipart upload (boto3 TransferConfig); the object appears only once every part is in."""
    src = _local(local_path)
    if not is_s3(uri):
        dst = _local(uri)
        if os.path.abspath(src) == os.path.abspath(dst):
            return

        def copy(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 8 * _MiB)

        _atomic_local_write(dst, copy)
        return
    cfg = _config(config)
    bucket, key = split_s3(uri)
    size = os.path.getsize(src)
    threshold = cfg.multipart_threshold if multipart_threshold is None else multipart_threshold
    logger.debug("upload %s -> %s (%d bytes)", src, uri, size)
    try:
        if size < threshold:
            # One PUT: boto3's transfer manager would spin up a thread pool for nothing.
            with open(src, "rb") as f:
                _client(cfg).put_object(Bucket=bucket, Key=key, Body=f)
        else:
            _client(cfg).upload_file(src, bucket, key, Config=_transfer_config(cfg, threshold, chunk_size))
    except _boto_errors() as exc:
        raise _wrap(exc, op="upload", uri=uri, config=cfg) from None


def get_bytes(uri: str, *, expected_sha256: str | None = None, config: S3Config | None = None) -> bytes:
    """Read a whole object. With ``expected_sha256`` an :class:`IntegrityError` is raised on mismatch."""
    if not is_s3(uri):
        try:
            with open(_local(uri), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"read {uri} failed: no such file", uri=uri, code="NoSuchKey") from None
    else:
        cfg = _config(config)
        bucket, key = split_s3(uri)
        try:
            data = _client(cfg).get_object(Bucket=bucket, Key=key)["Body"].read()
        except _boto_errors() as exc:
            raise _wrap(exc, op="read", uri=uri, config=cfg) from None
    _check_sha(sha256_bytes(data), expected_sha256, uri)
    return data


def get_range(uri: str, start: int, length: int, *, config: S3Config | None = None) -> bytes:
    """Bytes [start, start + length) of an object (fewer at its end): a header without the body (preflight
    reads safetensors headers of an S3 model this way instead of downloading gigabytes of weights)."""
    if length <= 0:
        return b""
    if not is_s3(uri):
        try:
            with open(_local(uri), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"read {uri} failed: no such file", uri=uri, code="NoSuchKey") from None
    cfg = _config(config)
    bucket, key = split_s3(uri)
    try:
        response = _client(cfg).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        return response["Body"].read(length)
    except _boto_errors() as exc:
        raise _wrap(exc, op="read", uri=uri, config=cfg) from None


def get_file(
    uri: str,
    local_path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    config: S3Config | None = None,
) -> None:
    """Copy ``uri`` to a local file atomically; with ``expected_sha256`` a mismatching download
    raises :class:`IntegrityError` and leaves ``local_path`` untouched."""
    dst = _local(local_path)
    if not is_s3(uri):
        src = _local(uri)
        if not os.path.isfile(src):
            raise ObjectNotFoundError(f"read {uri} failed: no such file", uri=uri, code="NoSuchKey")
        if expected_sha256 is not None:
            _check_sha(sha256_file(src), expected_sha256, uri)
        if os.path.abspath(src) != os.path.abspath(dst):
            put_file(src, dst)
        return
    cfg = _config(config)
    bucket, key = split_s3(uri)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        try:
            digest = _download(cfg, bucket, key, tmp)
        except _boto_errors() as exc:
            error = _wrap(exc, op="download", uri=uri, config=cfg)
            if error.code == "AccessDenied":  # the download starts with a body-less HEAD
                error = _explain_denied(bucket, key, uri, cfg, op="download") or error
            raise error from None
        _check_sha(digest, expected_sha256, uri)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _fetch_range(cfg: S3Config, bucket: str, key: str, etag: str, fd: int, start: int, end: int) -> None:
    """GET bytes [start, end] and pwrite them at their offset, re-trying when the body breaks off
    mid-read (botocore retries the request, not the body). ``etag`` pins every range to the same
    object version: a concurrent overwrite gives PreconditionFailed, not a file stitched from two."""
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    for attempt in range(1, cfg.max_attempts + 1):
        response = _client(cfg).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", IfMatch=etag)
        offset = start
        try:
            for piece in response["Body"].iter_chunks(_MiB):
                os.pwrite(fd, piece, offset)
                offset += len(piece)
        except (HTTPClientError, IncompleteReadError):
            if attempt == cfg.max_attempts:
                raise
            logger.debug("s3://%s/%s: range at %d broke off (attempt %d); retrying", bucket, key, start, attempt)
            continue
        if offset != end + 1:
            raise StorageError(
                f"download s3://{bucket}/{key} failed: IncompleteRead: range {start}-{end} ended at {offset}",
                uri=f"{S3_SCHEME}{bucket}/{key}",
                code="IncompleteRead",
            )
        return


def _download(cfg: S3Config, bucket: str, key: str, path: str) -> str:
    """Download to ``path`` with parallel ranged GETs and return the file's sha256.

    Why not boto3's download_file: the file would have to be read again afterwards to hash it
    (+0.7 s per 540 MB here). Ranges are written in place as they arrive while this thread hashes
    the file front to back as soon as each range is complete (from the page cache), so hashing
    overlaps the transfer. Memory stays at ~1 MiB per range in flight.
    """
    head = _client(cfg).head_object(Bucket=bucket, Key=key)
    total, etag = int(head["ContentLength"]), str(head["ETag"])
    chunk = cfg.multipart_chunksize
    hasher = hashlib.sha256()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        with concurrent.futures.ThreadPoolExecutor(cfg.max_concurrency) as pool:
            ranges = [(s, min(s + chunk, total) - 1) for s in range(0, total, chunk)]
            futures = [pool.submit(_fetch_range, cfg, bucket, key, etag, fd, s, e) for s, e in ranges]
            try:
                for (start, end), future in zip(ranges, futures, strict=True):
                    future.result()
                    offset = start
                    while offset <= end:
                        piece = os.pread(fd, min(8 * _MiB, end + 1 - offset), offset)
                        hasher.update(piece)
                        offset += len(piece)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        # No fsync: a download is a copy of durable data; syncing 0.5 GB tripled load time here.
    finally:
        os.close(fd)
    return hasher.hexdigest()


def exists(uri: str, *, config: S3Config | None = None) -> bool:
    """True if the object (local: regular file) exists. Auth and connection failures raise
    :class:`StorageError` rather than answering False, so a bad key never looks like "no checkpoint"."""
    if not is_s3(uri):
        return os.path.isfile(_local(uri))
    cfg = _config(config)
    bucket, key = split_s3(uri)
    try:
        _client(cfg).head_object(Bucket=bucket, Key=key)
    except _boto_errors() as exc:
        error = _wrap(exc, op="stat", uri=uri, config=cfg)
        if isinstance(error, ObjectNotFoundError):
            return False
        if error.code == "AccessDenied":
            # HEAD has no error body; a 1-key listing names the real cause (InvalidAccessKeyId, …).
            error = _explain_denied(bucket, key, uri, cfg, op="stat") or error
        raise error from None
    return True


def _explain_denied(bucket: str, key: str, uri: str, cfg: S3Config, *, op: str) -> StorageError | None:
    """Ask again with a request whose error has a body, to name the cause of a HEAD's bare 403."""
    try:
        _client(cfg).list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except _boto_errors() as exc:
        return _wrap(exc, op=op, uri=uri, config=cfg)
    return None


def list_prefix(uri: str, *, config: S3Config | None = None) -> list[str]:
    """Every object under the folder ``uri`` (recursive), as full URIs/paths, sorted.

    A missing folder lists as empty. Local temp files of in-flight atomic writes are hidden.
    """
    if not is_s3(uri):
        root = _local(uri)
        if os.path.isfile(root):
            return [root]
        found = []
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            found.extend(os.path.join(folder, name) for name in files if not _is_tmp(name))
        return sorted(found)
    cfg = _config(config)
    bucket, key = split_s3(uri)
    prefix = _folder_key(key)
    uris: list[str] = []
    try:
        paginator = _client(cfg).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            uris.extend(f"{S3_SCHEME}{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
    except _boto_errors() as exc:
        raise _wrap(exc, op="list", uri=uri, config=cfg) from None
    return sorted(uris)


def list_objects(uri: str, *, config: S3Config | None = None) -> list[tuple[str, int, str]]:
    """Like :func:`list_prefix`, with each object's size and version tag: ``(uri, size, etag)``.

    The tag is the S3 ETag (quotes stripped); for local files it is ``mtime_ns`` — enough to
    notice that an object changed under the same name (model_source keys its cache on it).
    """
    if not is_s3(uri):
        out = []
        for path in list_prefix(uri):
            st = os.stat(path)
            out.append((path, st.st_size, str(st.st_mtime_ns)))
        return out
    cfg = _config(config)
    bucket, key = split_s3(uri)
    found: list[tuple[str, int, str]] = []
    try:
        paginator = _client(cfg).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=_folder_key(key)):
            found.extend((f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
                         for obj in page.get("Contents", []))
    except _boto_errors() as exc:
        raise _wrap(exc, op="list", uri=uri, config=cfg) from None
    return sorted(found)


def download_prefix(uri: str, local_dir: str | os.PathLike[str], *, config: S3Config | None = None) -> list[str]:
    """Copy every object under the folder ``uri`` into ``local_dir``, keeping relative paths.

    Returns the local paths written, sorted. Used to bring a dataset folder (parquet + card) to a
    worker before reading it.
    """
    dst_root = os.fspath(local_dir)
    base = uri.rstrip("/") if is_s3(uri) else os.path.normpath(_local(uri))
    written = []
    for src in list_prefix(uri, config=config):
        rel = src[len(base) :].lstrip("/" + os.sep) if src != base else os.path.basename(src)
        # Drop "." / ".." segments: on S3 they are literal key names, here they would escape local_dir.
        segments = [seg for seg in rel.replace(os.sep, "/").split("/") if seg not in ("", ".", "..")]
        dst = os.path.join(dst_root, *segments)
        get_file(src, dst, config=config)
        written.append(dst)
    return sorted(written)


def delete(uri: str, *, config: S3Config | None = None) -> None:
    """Delete one object/file; a missing one is not an error (S3 DELETE is idempotent too)."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(uri))
        return
    cfg = _config(config)
    bucket, key = split_s3(uri)
    try:
        _client(cfg).delete_object(Bucket=bucket, Key=key)
    except _boto_errors() as exc:
        error = _wrap(exc, op="delete", uri=uri, config=cfg)
        if not isinstance(error, ObjectNotFoundError):
            raise error from None


def delete_prefix(uri: str, *, config: S3Config | None = None) -> int:
    """Delete everything under the folder ``uri`` (or the single file a local path names).

    Returns the number of objects/files deleted. A missing folder deletes nothing.
    """
    if not is_s3(uri):
        path = _local(uri)
        if os.path.isfile(path):
            os.remove(path)
            return 1
        if not os.path.isdir(path):
            return 0
        count = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path)
        return count
    cfg = _config(config)
    bucket, _ = split_s3(uri)
    keys = [split_s3(u)[1] for u in list_prefix(uri, config=cfg)]
    client = _client(cfg)
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = keys[start : start + 1000]
        try:
            response = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
        except _boto_errors() as exc:
            raise _wrap(exc, op="delete", uri=uri, config=cfg) from None
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                _scrub(
                    f"delete {uri} failed: {first.get('Code')}: {len(errors)} of {len(batch)} keys not deleted "
                    f"(first: {first.get('Key')}: {first.get('Message')})",
                    cfg,
                ),
                uri=uri,
                code=str(first.get("Code")),
            )
    logger.debug("deleted %d objects under %s", len(keys), uri)
    return len(keys)
