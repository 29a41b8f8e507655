"""Issue 17: the embedded SeaweedFS lets nobody in without the S3 keys, whatever port they try.

The test does not know weed's ports. It finds every socket the weed process (and any child) listens
on, from ``/proc/<pid>/fd`` and ``/proc/net/{tcp,tcp6,udp,udp6,unix}``, and requires each one to

- listen on loopback only;
- refuse an unauthenticated **read**: listings (filer-, S3- and master-style paths) and GETs of an
  existing object by filer path, S3 path and its real volume file id (read out of the volume's
  ``.idx``/``.dat`` files) must answer 4xx/5xx or not speak HTTP, and no answer may contain the
  object's key or bytes;
- refuse an unauthenticated **write**: PUT, multipart POST and DELETE on the same kinds of paths
  must not succeed, and afterwards authenticated S3 shows no new object and the old one unchanged;
- refuse **gRPC** without our client certificate: a plaintext HTTP/2 preface gets no SETTINGS frame
  back, and a TLS handshake without a client certificate fails.

Positive controls keep the probes honest: the same TLS probe *with* the server's client
certificate gets an HTTP/2 SETTINGS frame from every gRPC listener (and one from another CA gets
nothing), the file ids read from disk are checked to point at the object's bytes, and
:func:`test_probes_find_the_old_bypass` runs the probes against weed mini started the old way (no
security.toml, HTTP APIs on) and requires them to find the open filer. Every probe has a timeout
and the whole sweep a deadline; everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from amft_lib.s3server import EmbeddedS3, S3ServerError, _make_tls, find_weed

pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

TIMEOUT = 2.0  # seconds per connection / request
SWEEP_DEADLINE = 90.0  # seconds for all probes of one server
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# ── finding the listeners ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, order=True)
class Listener:
    kind: str  # tcp | tcp6 | udp | udp6 | unix
    host: str  # IP, or the socket path for unix
    port: int  # 0 for unix

    @property
    def target(self) -> tuple[str, int] | str:
        return self.host if self.kind == "unix" else (self.host, self.port)

    def __str__(self) -> str:
        return self.host if self.kind == "unix" else f"{self.kind} {self.host}:{self.port}"


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def _socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
    return inodes


def _decode_ip(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    # /proc/net prints the address as 32-bit words in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(words) == 4 else socket.AF_INET6, words)


def listening_sockets(pid: int) -> list[Listener]:
    """Every socket of pid's process tree that accepts connections or datagrams."""
    inodes = _socket_inodes(_process_tree(pid))
    found = set()
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
                cols = line.split()
                state, inode = cols[3], int(cols[9])
                # TCP: 0A = LISTEN. UDP: any bound socket of the process receives datagrams.
                if inode in inodes and (state == "0A" or kind.startswith("udp")):
                    ip, port = cols[1].split(":")
                    found.add(Listener(kind, _decode_ip(ip), int(port, 16)))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        # Num RefCount Protocol Flags Type St Inode [Path]; Flags 0x10000 = __SO_ACCEPTCON (listening).
        if len(cols) >= 7 and int(cols[6]) in inodes and int(cols[3], 16) & 0x10000:
            found.add(Listener("unix", cols[7] if len(cols) > 7 else "(unnamed)", 0))
    return sorted(found)


# ── probes ──────────────────────────────────────────────────────────────────────────────────────


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def http_request(
    target: tuple[str, int] | str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int | None, bytes]:
    """(status, first 64 KiB of the body) without credentials or redirects; status None when the
    listener does not answer HTTP (closed, reset, TLS-only, timeout)."""
    if isinstance(target, str):
        conn: http.client.HTTPConnection = _UnixHTTPConnection(target, TIMEOUT)
    else:
        conn = http.client.HTTPConnection(target[0], target[1], timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body or None, headers={"Accept-Encoding": "identity", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read(65536)
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def _connect(target: tuple[str, int] | str) -> socket.socket:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(target)
        return sock
    return socket.create_connection(target, timeout=TIMEOUT)


def _is_settings_frame(data: bytes) -> bool:
    return len(data) >= 9 and data[3] == 0x04  # HTTP/2 frame header: length(3) type(1)=SETTINGS


def h2_plaintext_accepted(target: tuple[str, int] | str) -> bool:
    """True if the listener speaks plaintext HTTP/2 (gRPC without TLS) to anyone."""
    try:
        with _connect(target) as sock:
            sock.sendall(H2_PREFACE)
            return _is_settings_frame(sock.recv(64))
    except OSError:
        return False


def tls_h2_accepted(target: tuple[str, int] | str, cert: tuple[Path, Path] | None = None) -> bool:
    """True if a TLS client (no server verification; with `cert` as client certificate if given)
    gets an HTTP/2 SETTINGS frame back."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with _connect(target) as raw, context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(H2_PREFACE)
            return _is_settings_frame(sock.recv(64))
    except (OSError, ssl.SSLError):
        return False


# ── the object we try to steal, and its file ids on the volume ──────────────────────────────────


@dataclass
class Secret:
    bucket: str
    key: str
    body: bytes
    key_token: str  # appears in the key only
    body_token: bytes  # appears in the body only
    file_ids: list[str] = field(default_factory=list)


def _needle_file_ids(data_dir: Path, body_token: bytes) -> list[str]:
    """File ids ``VID,NEEDLEIDCOOKIE`` of the needles in data_dir whose bytes contain body_token.

    An ``.idx`` entry is needle id (8 bytes, big-endian), offset in 8-byte units (4 bytes, or 5 in
    weed's "large disk" builds) and size (4). A needle in the ``.dat`` starts with cookie (4), needle
    id (8), size (4). Both layouts are tried; an entry counts when the ``.dat`` header agrees.
    """
    found = []
    for idx in sorted(data_dir.glob("*.idx")):
        dat = idx.with_suffix(".dat")
        match = re.search(r"(\d+)$", idx.stem)
        if not dat.exists() or match is None:
            continue
        vid, index, volume = int(match.group(1)), idx.read_bytes(), dat.read_bytes()
        for width in (17, 16):
            if len(index) % width:
                continue
            ids = []
            for pos in range(0, len(index), width):
                entry = index[pos : pos + width]
                needle_id = struct.unpack(">Q", entry[:8])[0]
                offset = struct.unpack(">I", entry[8:12])[0] + ((entry[12] << 32) if width == 17 else 0)
                start = offset * 8
                header = volume[start : start + 16]
                if len(header) < 16 or struct.unpack(">Q", header[4:12])[0] != needle_id:
                    break
                cookie, size = struct.unpack(">I", header[:4])[0], struct.unpack(">I", header[12:16])[0]
                if body_token in volume[start + 16 : start + 16 + size]:
                    ids.append(f"{vid},{needle_id:x}{cookie:08x}")
            else:
                found.extend(ids)
                break
    return found


def _s3(server: EmbeddedS3):
    settings = server.settings
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def _plant_secret(server: EmbeddedS3) -> Secret:
    key_token = "ktok" + secrets.token_hex(8)
    body_token = b"BTOK" + secrets.token_hex(12).encode()
    # Incompressible bytes, so weed stores them as they are and the token is findable on disk.
    body = body_token + os.urandom(4096) + body_token
    secret = Secret(server.bucket, f"runs/r1/checkpoints/{key_token}/trainer_state.bin", body, key_token, body_token)
    _s3(server).put_object(Bucket=secret.bucket, Key=secret.key, Body=body)
    secret.file_ids = _needle_file_ids(server.data_dir / "data", body_token)
    return secret


def _all_keys(server: EmbeddedS3) -> list[str]:
    keys: list[str] = []
    for page in _s3(server).get_paginator("list_objects_v2").paginate(Bucket=server.bucket):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


# ── the sweep ───────────────────────────────────────────────────────────────────────────────────


@dataclass
class Finding:
    listener: Listener
    what: str

    def __str__(self) -> str:
        return f"{self.listener}: {self.what}"


def _multipart(name: str, content: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "amftprobe" + secrets.token_hex(6)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def sweep(server: EmbeddedS3, secret: Secret, listeners: list[Listener]) -> tuple[list[Finding], dict[str, object]]:
    """Probe every listener; returns (what got through, a summary per listener for the report)."""
    deadline = time.monotonic() + SWEEP_DEADLINE
    findings: list[Finding] = []
    summary: dict[str, object] = {}
    bucket, key = secret.bucket, secret.key
    folder = key.rsplit("/", 1)[0]
    read_paths = [
        # listings: filer, S3 (path and query style), master/volume status-style
        "/",
        "/?pretty=y",
        "/buckets/",
        f"/buckets/{bucket}/",
        f"/buckets/{bucket}/{folder}/",
        f"/{bucket}",
        f"/{bucket}?list-type=2",
        f"/{bucket}/?list-type=2&prefix=runs/",
        "/dir/lookup?volumeId=1",
        # the object itself: filer path, S3 path, filer path with metadata, volume file ids
        f"/buckets/{bucket}/{key}",
        f"/buckets/{bucket}/{key}?metadata=true",
        f"/{bucket}/{key}",
        *[f"/{fid}" for fid in secret.file_ids],
        *[f"/{fid.replace(',', '/')}" for fid in secret.file_ids],
    ]
    evil = "evil" + secrets.token_hex(6)
    payload = b"planted by the listener test " + evil.encode()
    multipart, multipart_headers = _multipart(f"{evil}.json", payload)
    vid = secret.file_ids[0].split(",")[0] if secret.file_ids else "1"
    writes: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("PUT", f"/buckets/{bucket}/{folder}/{evil}.json", payload, {}),
        ("POST", f"/buckets/{bucket}/{folder}/", multipart, multipart_headers),
        ("POST", f"/buckets/{bucket}/{folder}/{evil}.json", multipart, multipart_headers),
        ("PUT", f"/{bucket}/{folder}/{evil}.json", payload, {}),
        ("POST", f"/{vid},{secrets.token_hex(5)}{secrets.token_hex(4)}", multipart, multipart_headers),
        ("POST", "/submit", multipart, multipart_headers),
        ("GET", "/dir/assign", b"", {}),  # a write token; refused or empty is fine, checked below
        ("DELETE", f"/buckets/{bucket}/{key}", b"", {}),
        ("DELETE", f"/{bucket}/{key}", b"", {}),
        *[("DELETE", f"/{fid}", b"", {}) for fid in secret.file_ids],
    ]
    for listener in listeners:
        if listener.kind.startswith("udp"):
            findings.append(Finding(listener, "UDP socket (nothing of weed's should be listening on UDP)"))
            continue
        if listener.kind != "unix" and listener.host not in LOOPBACK:
            findings.append(Finding(listener, "listens beyond loopback"))
        statuses: dict[str, int | None] = {}
        for path in read_paths:
            assert time.monotonic() < deadline, "probe sweep ran past its deadline"
            status, body = http_request(listener.target, "GET", path)
            statuses[f"GET {path}"] = status
            # A 403 may echo the request path back (S3's <Resource>): the key only counts if not asked for.
            if secret.body_token in body or (secret.key_token not in path and secret.key_token.encode() in body):
                findings.append(Finding(listener, f"GET {path} -> {status} reveals the object's key or bytes"))
            elif status is not None and status < 300 and (path.endswith(key) or path.split("?")[0].endswith(key)):
                findings.append(Finding(listener, f"GET {path} -> {status} (object read without auth)"))
            elif status is not None and status < 300 and any(f in path for f in secret.file_ids):
                findings.append(Finding(listener, f"GET {path} -> {status} (volume read without auth)"))
        for method, path, body, headers in writes:
            assert time.monotonic() < deadline, "probe sweep ran past its deadline"
            status, answer = http_request(listener.target, method, path, body, headers)
            statuses[f"{method} {path}"] = status
            if path == "/dir/assign":
                if status is not None and status < 300 and b'"fid"' in answer:
                    findings.append(Finding(listener, "GET /dir/assign hands out a file id (and write JWT)"))
            elif status is not None and status < 300:
                findings.append(Finding(listener, f"{method} {path} -> {status} (write accepted without auth)"))
        plaintext = h2_plaintext_accepted(listener.target)
        no_cert = tls_h2_accepted(listener.target)
        if plaintext:
            findings.append(Finding(listener, "speaks plaintext HTTP/2 (gRPC without TLS)"))
        if no_cert:
            findings.append(Finding(listener, "speaks HTTP/2 over TLS to a client without a certificate"))
        answered = sorted({s for s in statuses.values() if s is not None})
        summary[str(listener)] = {"http_statuses": answered, "h2c": plaintext, "tls_without_cert": no_cert}
    # Whatever the answers said: nothing new in the bucket, the object still there and unchanged.
    keys = _all_keys(server)
    planted = [k for k in keys if evil in k]
    if planted:
        findings.append(Finding(Listener("s3", "authenticated listing", 0), f"objects were created: {planted}"))
    if key not in keys:
        findings.append(Finding(Listener("s3", "authenticated listing", 0), f"{key} was deleted"))
    else:
        stored = _s3(server).get_object(Bucket=bucket, Key=key)["Body"].read()
        if stored != secret.body:
            findings.append(Finding(Listener("s3", "authenticated read", 0), f"{key} was changed"))
    return findings, summary


# ── tests ───────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(str(exc))
    srv = EmbeddedS3(tmp_path_factory.mktemp("seaweedfs-listeners"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _report(title: str, listeners: list[Listener], summary: dict[str, object]) -> None:
    print(f"\n{title}: {len(listeners)} listening sockets")
    for listener in listeners:
        print(f"  {listener}: {summary.get(str(listener))}")


def test_every_listener_refuses_unauthenticated_reads_writes_and_grpc(server: EmbeddedS3, tmp_path: Path) -> None:
    secret = _plant_secret(server)
    assert secret.file_ids, "the object's needle was not found in the volume files (probe would be vacuous)"
    listeners = listening_sockets(server.pid)
    tcp = [item for item in listeners if item.kind.startswith("tcp")]
    assert any(item.port == int(server.settings.endpoint_url.rsplit(":", 1)[1]) for item in tcp)
    assert len(tcp) >= 6, listeners  # S3 plus the filer/master/volume/admin servers and their gRPC ports

    findings, summary = sweep(server, secret, listeners)
    _report("embedded SeaweedFS", listeners, summary)
    assert findings == [], "\n".join(map(str, findings))

    # Positive control: with weed's own client certificate the gRPC listeners do answer HTTP/2, so
    # the refusals above are the missing certificate, not a probe that cannot talk gRPC.
    cert = (server.security_dir / "weed.crt", server.security_dir / "weed.key")
    grpc = [item for item in listeners if tls_h2_accepted(item.target, cert)]
    assert len([item for item in grpc if item.kind.startswith("tcp")]) >= 5, grpc
    assert any(item.kind == "unix" for item in grpc), grpc  # the /tmp/seaweedfs-*-grpc-*.sock ones

    # A certificate from any other CA (one an attacker can make) gets nowhere either.
    (tmp_path / "foreign-ca").mkdir()
    foreign = _make_tls(tmp_path / "foreign-ca")
    assert [item for item in grpc if tls_h2_accepted(item.target, (foreign["cert"], foreign["key"]))] == []

    # The S3 gateway itself: anonymous listing/reading/writing is refused, signed requests work.
    host, port = server.settings.endpoint_url.split("//")[1].rsplit(":", 1)
    s3_target = (host, int(port))
    assert http_request(s3_target, "GET", f"/{secret.bucket}/{secret.key}")[0] == 403
    assert _s3(server).get_object(Bucket=secret.bucket, Key=secret.key)["Body"].read() == secret.body


class _OldStyleS3(EmbeddedS3):
    """weed mini as it was started before issue 17: no security.toml, filer and master HTTP on."""

    def _command(self, weed: str, ports: dict[str, int]) -> list[str]:
        (self.security_dir / "security.toml").unlink()  # weed also looks in its working directory
        return [arg for arg in super()._command(weed, ports) if arg != "-disableHttp" and "-config_dir" not in arg]


def test_probes_find_the_old_bypass(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Negative control: the same sweep flags the filer bypass the issue reported on the old setup."""
    try:
        find_weed()
    except S3ServerError as exc:
        pytest.skip(str(exc))
    with _OldStyleS3(tmp_path_factory.mktemp("seaweedfs-old")) as old:
        secret = _plant_secret(old)
        listeners = listening_sockets(old.pid)
        findings, summary = sweep(old, secret, listeners)
    _report("old-style weed mini (before issue 17)", listeners, summary)
    text = "\n".join(map(str, findings))
    print(text)
    assert "reveals the object's key or bytes" in text  # filer listing / GET
    assert "objects were created" in text  # filer PUT / multipart POST
    assert "plaintext HTTP/2" in text  # gRPC without TLS
    assert "/dir/assign" in text  # master hands out write tokens
