"""Fixtures for tests against a real SeaweedFS (``amft_lib.s3server``); mark such tests ``@pytest.mark.s3``.

- ``s3_server`` (session): one ``weed mini`` for the whole run (~1 s to start, ~2.5 s to stop).
- ``s3`` (per test): that server's :class:`S3Settings`, with the AWS_* variables pointing at it for
  the duration of the test and restored afterwards (monkeypatch). Per test rather than per session so
  a test that breaks the credentials cannot leak into the next one, and tests that do not ask for
  S3 never see the variables.
- ``s3_prefix`` (per test): a fresh ``s3://amft/tests/<test>-<random>`` folder, so tests sharing the
  server never see each other's objects.
- ``private_s3`` (per test): a server of the test's own, for tests that stop/restart/kill it.

The whole module is skipped when the ``weed`` binary is missing.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

from amft_lib.s3server import EmbeddedS3, S3ServerError, S3Settings, find_weed


def _point_env_at(settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    for name, value in settings.env().items():
        monkeypatch.setenv(name, value)
    # No ~/.aws profile, no instance-metadata lookups; few retries so failure tests stay fast.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(str(exc))
    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> S3Settings:
    if not s3_server.is_running():  # a test must not stop the shared server, but recover if one did
        s3_server.start()
    _point_env_at(s3_server.settings, monkeypatch)
    return s3_server.settings


@pytest.fixture
def s3_prefix(s3: S3Settings, request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:48]
    return s3.uri("tests", f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def private_s3(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedS3]:
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(str(exc))
    server = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs-private"))
    server.start()
    _point_env_at(server.settings, monkeypatch)
    try:
        yield server
    finally:
        server.stop()
