"""amft_lib.storage on local paths, URI helpers, config parsing and error scrubbing (no server needed)."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amft_lib import storage


def test_local_round_trip_put_get_list_delete(tmp_path) -> None:
    root = str(tmp_path / "run")
    a = storage.join(root, "a.txt")
    b = storage.join(root, "sub", "deeper", "b.bin")  # parent folders are created
    storage.put_bytes(a, b"hello")
    storage.put_bytes(b, bytes(range(256)))
    storage.put_bytes(storage.join(str(tmp_path), "run-2", "c.txt"), b"sibling")

    assert storage.get_bytes(a, expected_sha256=storage.sha256_bytes(b"hello")) == b"hello"
    assert storage.exists(a) and not storage.exists(storage.join(root, "nope"))
    assert not storage.exists(root)  # a folder is not an object
    assert storage.list_prefix(root) == sorted([a, b])
    assert storage.list_prefix(storage.join(root, "a.txt")) == [a]
    assert storage.list_prefix(storage.join(root, "absent")) == []

    assert storage.delete_prefix(root) == 2
    assert storage.list_prefix(root) == [] and not os.path.exists(root)
    assert storage.exists(storage.join(str(tmp_path), "run-2", "c.txt"))
    assert storage.delete_prefix(root) == 0
    storage.delete(a)  # missing: no error


def test_download_prefix_copies_the_tree(tmp_path) -> None:
    src = str(tmp_path / "data")
    storage.put_bytes(storage.join(src, "train.parquet"), b"t")
    storage.put_bytes(storage.join(src, "card", "card.json"), b"{}")
    written = storage.download_prefix(src, tmp_path / "copy")
    assert written == sorted([str(tmp_path / "copy" / "card" / "card.json"), str(tmp_path / "copy" / "train.parquet")])
    assert (tmp_path / "copy" / "card" / "card.json").read_bytes() == b"{}"


def test_file_uri_scheme_is_accepted(tmp_path) -> None:
    path = tmp_path / "x.txt"
    storage.put_bytes(f"file://{path}", b"via file://")
    assert path.read_bytes() == b"via file://"
    assert storage.get_bytes(f"file://{path}") == b"via file://"


def test_put_file_and_get_file_copy_atomically(tmp_path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    storage.put_file(src, str(tmp_path / "dst" / "copy.bin"))
    copy = str(tmp_path / "dst" / "copy.bin")
    storage.get_file(copy, tmp_path / "back.bin", expected_sha256=storage.sha256_file(src))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    storage.put_file(src, str(src))  # same path: no-op, not a truncation
    assert src.stat().st_size == 300_000


def test_failed_local_write_keeps_old_content_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "state.json"
    storage.put_bytes(str(target), b"old")

    def write_then_crash(f) -> None:
        f.write(b"half of the new con")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        storage._atomic_local_write(str(target), write_then_crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    with pytest.raises(FileNotFoundError):
        storage.put_file(tmp_path / "no-such-source", str(target))
    assert target.read_bytes() == b"old"


def test_listing_hides_in_flight_temp_files(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"done")
    (tmp_path / ".optimizer.pt.tmp-0123456789ab").write_bytes(b"half")
    assert storage.list_prefix(str(tmp_path)) == [str(tmp_path / "model.safetensors")]


def test_sha256_helpers_and_mismatch(tmp_path) -> None:
    data = os.urandom(5 * (1 << 20) + 3)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert storage.sha256_bytes(data) == hashlib.sha256(data).hexdigest() == storage.sha256_file(path)

    wrong = storage.sha256_bytes(b"other")
    with pytest.raises(storage.IntegrityError, match="sha256 mismatch") as info:
        storage.get_bytes(str(path), expected_sha256=wrong)
    assert info.value.code == "IntegrityError" and str(path) in str(info.value)
    with pytest.raises(storage.IntegrityError):
        storage.get_file(str(path), tmp_path / "copy", expected_sha256=wrong)
    assert not (tmp_path / "copy").exists()
    # Upper-case hex from other tools is accepted.
    assert storage.get_bytes(str(path), expected_sha256=storage.sha256_bytes(data).upper()) == data


def test_missing_local_file_is_object_not_found(tmp_path) -> None:
    with pytest.raises(storage.ObjectNotFoundError) as info:
        storage.get_bytes(str(tmp_path / "nope"))
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        storage.get_file(str(tmp_path / "nope"), tmp_path / "x")


def test_uri_helpers() -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("S3:/b")
    assert storage.split_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///key")
    assert storage.join("s3://b/runs/", "/r1/", "checkpoints", "", "LATEST") == "s3://b/runs/r1/checkpoints/LATEST"
    assert storage.join("s3://b") == "s3://b"
    assert storage.join("/data/run", "/etc", "x") == "/data/run/etc/x"  # never escapes to an absolute path
    with pytest.raises(ValueError):
        storage.join("/data/run", "../../etc")


@given(
    st.lists(
        st.text(alphabet=st.sampled_from("abc-_./0123456789"), min_size=0, max_size=8), min_size=0, max_size=5
    )
)
def test_join_stays_under_the_base_and_has_no_empty_segments(parts: list[str]) -> None:
    base = "s3://bucket/prefix"
    segments = [seg for p in parts for seg in p.split("/") if seg]
    if any(seg in (".", "..") for seg in segments):
        with pytest.raises(ValueError):
            storage.join(base, *parts)
        return
    joined = storage.join(base, *parts)
    assert joined == "/".join([base, *segments])
    assert "//" not in joined[len("s3://") :]
    local = storage.join("/data/run", *parts)
    assert local == os.path.normpath(local) or local == "/data/run"


def test_config_from_env_precedence_and_secret_hidden() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz",
        "AWS_ENDPOINT_URL": "http://generic:1",
        "MLFLOW_S3_ENDPOINT_URL": "http://mlflow:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_MAX_ATTEMPTS": "7",
    }
    cfg = storage.S3Config.from_env(env)
    assert (cfg.endpoint_url, cfg.region, cfg.max_attempts) == ("http://generic:1", "eu-west-1", 7)
    assert storage.S3Config.from_env(env | {"AWS_ENDPOINT_URL_S3": "http://s3:3"}).endpoint_url == "http://s3:3"
    env.pop("AWS_ENDPOINT_URL")
    assert storage.S3Config.from_env(env).endpoint_url == "http://mlflow:2"
    assert storage.S3Config.from_env(env | {"AWS_REGION": "ap-south-1"}).region == "ap-south-1"
    assert "s3cr3t-value-xyz" not in repr(cfg) and "AKIDEXAMPLE" in repr(cfg)

    with pytest.raises(ValueError, match="both"):
        storage.S3Config.from_env({"AWS_ACCESS_KEY_ID": "only-the-id"})
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS"):
        storage.S3Config.from_env({"AWS_MAX_ATTEMPTS": "many"})
    with pytest.raises(ValueError, match="5 MiB"):
        storage.S3Config(multipart_chunksize=1 << 20)


def test_error_messages_are_one_line_and_scrubbed_of_secrets() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    cfg = storage.S3Config(endpoint_url="http://127.0.0.1:1", access_key_id="AKID", secret_access_key="TOPSECRET")
    # A (hypothetical) server that echoes the secret back, over two lines.
    echo = ClientError(
        {"Error": {"Code": "SignatureDoesNotMatch", "Message": "expected key TOPSECRET\nsee docs"}}, "PutObject"
    )
    err = storage._wrap(echo, op="write", uri="s3://b/k", config=cfg)
    assert str(err) == (
        "write s3://b/k failed: SignatureDoesNotMatch: expected key *** see docs (endpoint http://127.0.0.1:1)"
    )
    assert err.code == "SignatureDoesNotMatch" and err.uri == "s3://b/k"

    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    down = storage._wrap(unreachable, op="read", uri="s3://b/k", config=cfg)
    assert down.code == "EndpointConnectionError"
    assert "cannot reach http://127.0.0.1:1" in str(down) and "attempts" in str(down)

    head_404 = ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadObject")
    assert isinstance(storage._wrap(head_404, op="stat", uri="s3://b/k", config=cfg), storage.ObjectNotFoundError)


def test_get_range_reads_a_slice_and_stops_at_the_end(tmp_path):
    from amft_lib import storage

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(10)))
    assert storage.get_range(str(path), 2, 3) == bytes([2, 3, 4])
    assert storage.get_range(str(path), 8, 5) == bytes([8, 9])  # fewer at the end, as S3 answers a Range
    assert storage.get_range(str(path), 0, 0) == b""
    with pytest.raises(storage.ObjectNotFoundError, match="no such file"):
        storage.get_range(str(tmp_path / "missing"), 0, 8)
