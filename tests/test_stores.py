"""Object stores: FileStore on a temp dir; S3Store against a real SeaweedFS (`weed mini`)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from diloco.comm.stores import FileStore, ObjectInfo, S3Store, StoreError, open_store
from tests.seaweed import BUCKET, free_ports

pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------------------- FileStore


def round_trip(store) -> list[ObjectInfo]:
    """Puts (one overwritten, one empty), gets and listings every store must agree on."""
    t0 = time.time()
    store.check()
    store.put("round1/peer-b", b"bbb")
    store.put("round1/peer-a", b"a")
    store.put("round2/peer-a", b"")
    store.put("round1/peer-a", b"aa")  # overwrite
    assert store.get("round1/peer-a", 10) == b"aa"
    assert store.get("round2/peer-a", 10) == b""
    assert store.get("round2/peer-a", 0) == b""
    infos = store.list("")
    assert [(o.key, o.size) for o in infos] == [
        ("round1/peer-a", 2),
        ("round1/peer-b", 3),
        ("round2/peer-a", 0),
    ]
    assert all(isinstance(o, ObjectInfo) and abs(o.mtime - t0) < 60 for o in infos)
    assert [o.key for o in store.list("round1/")] == ["round1/peer-a", "round1/peer-b"]
    assert [o.key for o in store.list("round")] == [o.key for o in infos]
    return infos


def test_file_round_trip(tmp_path):
    store = FileStore(tmp_path / "root")
    round_trip(store)
    assert [o.key for o in store.list("round1/peer-b")] == ["round1/peer-b"]
    assert store.list("round3/") == [] and store.list("nothing") == []
    assert store.url == (tmp_path / "root").as_uri()


def test_file_get_missing_and_too_large(tmp_path):
    store = FileStore(tmp_path)
    assert store.get("nope", 10) is None
    assert store.get("dir/nope", 10) is None
    store.put("k", b"x" * 100)
    assert store.get("k", 100) == b"x" * 100
    assert store.get("k", 99) is None
    assert store.get("k", 0) is None


def test_file_put_is_atomic(tmp_path):
    store = FileStore(tmp_path)
    payloads = [bytes([i]) * (1 << 20) for i in range(4)]
    sizes = {len(p) for p in payloads}
    store.put("peer/grad", payloads[0])
    stop, seen, problems = threading.Event(), 0, []

    def read() -> None:
        nonlocal seen
        while not stop.is_set():
            for o in store.list(""):
                if ".tmp-" in o.key or o.size not in sizes:
                    problems.append(f"list saw {o}")
            data = store.get("peer/grad", 1 << 21)
            if data not in payloads:
                problems.append(f"get saw a partial object ({None if data is None else len(data)})")
            seen += 1

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(100):
        store.put("peer/grad", payloads[i % 4])
        store.put(f"peer/other{i % 3}", payloads[i % 4])
    stop.set()
    reader.join()
    assert not problems, problems[:3]
    assert seen > 0
    assert sorted(p.name for p in (tmp_path / "peer").iterdir()) == [
        "grad",
        "other0",
        "other1",
        "other2",
    ]


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/..", "..", "", "a//b"])
def test_file_rejects_escaping_keys(tmp_path, key):
    store = FileStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key, 10)
    assert not (tmp_path / "x").exists()


def test_file_rejects_temp_names_and_bad_prefixes(tmp_path):
    store = FileStore(tmp_path)
    with pytest.raises(ValueError):
        store.put("a/.tmp-123", b"x")
    with pytest.raises(ValueError):
        store.list("../")
    with pytest.raises(ValueError):
        store.list("/abs")


def test_file_check_unwritable(tmp_path):
    (tmp_path / "plain").write_bytes(b"not a directory")
    for root in (tmp_path / "plain", tmp_path / "plain" / "sub"):
        store = FileStore(root)
        with pytest.raises(StoreError, match="cannot write") as err:
            store.check()
        assert store.url in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(StoreError):
            store.put("k", b"x")
    FileStore(tmp_path / "new" / "deep").check()  # creatable is fine
    assert (tmp_path / "new" / "deep").is_dir() and not any((tmp_path / "new" / "deep").iterdir())


def test_open_store_schemes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    abs_store = open_store(f"file://{tmp_path}/a")
    assert isinstance(abs_store, FileStore) and abs_store.root == tmp_path / "a"
    rel = open_store("file://rel/dir")
    assert isinstance(rel, FileStore) and rel.root == Path("rel/dir")
    plain = open_store("plain/dir")
    assert isinstance(plain, FileStore) and plain.root == Path("plain/dir")
    s3 = open_store("s3://bkt/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bkt", "some/prefix")
    assert s3.url == "s3://bkt/some/prefix"
    for bad in ("http://host/x", "gs://bkt/p", "s3://", "s3:///p", "file://", ""):
        with pytest.raises(ValueError, match="file://") as err:
            open_store(bad)
        assert repr(bad) in str(err.value)


def test_s3_without_boto3(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(StoreError, match="pip install boto3"):
        S3Store("bkt", "p")


# ---------------------------------------------------------------------------- SeaweedFS
def test_s3_round_trip(seaweed, creds):
    store = open_store(f"s3://{BUCKET}/run1/peers", endpoint_url=seaweed.endpoint)
    infos = round_trip(store)
    # The prefix is a directory: a sibling whose name merely starts the same sees nothing.
    other = S3Store(BUCKET, "run1/peersX", endpoint_url=seaweed.endpoint)
    assert other.list("") == []
    other.put("x", b"x")
    assert [o.key for o in store.list("")] == [o.key for o in infos]
    raw = S3Store(BUCKET, "", endpoint_url=seaweed.endpoint)
    assert raw.get("run1/peers/round1/peer-b", 10) == b"bbb"


def test_s3_get_bounds(seaweed, creds):
    store = S3Store(BUCKET, "bounds", endpoint_url=seaweed.endpoint)
    store.put("k", bytes(range(100)))
    assert store.get("k", 100) == bytes(range(100))
    assert store.get("k", 1000) == bytes(range(100))
    assert store.get("k", 99) is None
    assert store.get("k", 0) is None
    assert store.get("missing", 10) is None
    assert store.get("dir/missing", 10) is None
    with pytest.raises(ValueError):
        store.get("../k", 10)


def test_s3_empty_put_does_not_stall(seaweed, creds):
    # botocore + Expect: 100-continue: a put the server answers early (an empty body) used to
    # poison the pooled connection, so the next put waited out read_timeout (10 s) and retried.
    store = S3Store(BUCKET, "stall", endpoint_url=seaweed.endpoint)
    for i, data in enumerate([b"", b"x", b"", b"yy", b"", b"", b"zzz"]):
        t0 = time.monotonic()
        store.put(f"k{i % 2}", data)
        assert time.monotonic() - t0 < 2.0, f"put {i} ({len(data)} bytes) stalled"
    assert store.get("k0", 10) == b"zzz"


def test_s3_missing_bucket(seaweed, creds):
    store = open_store("s3://no-such-bucket/p", endpoint_url=seaweed.endpoint)
    with pytest.raises(StoreError, match="bucket no-such-bucket does not exist") as err:
        store.check()
    assert "s3://no-such-bucket/p" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StoreError, match="no-such-bucket"):
        store.get("k", 10)  # a missing bucket is an error, not a missing object


@pytest.mark.parametrize("var", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_s3_bad_credentials(seaweed, creds, var):
    creds.setenv(var, "wrong")
    store = S3Store(BUCKET, "p", endpoint_url=seaweed.endpoint)
    with pytest.raises(StoreError, match="bad credentials") as err:
        store.check()
    assert f"s3://{BUCKET}/p" in str(err.value) and "\n" not in str(err.value)
    for call in (lambda: store.put("k", b"x"), lambda: store.get("k", 1), lambda: store.list("")):
        with pytest.raises(StoreError, match="credentials"):
            call()


def test_s3_unreachable(creds):
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    store = open_store("s3://bkt/p", endpoint_url=endpoint, timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach {endpoint}") as err:
        store.check()
    with pytest.raises(StoreError, match="cannot reach"):
        store.put("k", b"x")
    assert time.monotonic() - t0 < 15
    assert str(err.value).startswith("s3://bkt/p: ") and "\n" not in str(err.value)


def test_file_store_skips_fifos_and_links_instead_of_hanging(tmp_path):
    store = FileStore(tmp_path)
    store.put("run/0/1", b"real")
    os.mkfifo(tmp_path / "run" / "0" / "2")  # a reader would block until a writer came
    (tmp_path / "run" / "0" / "3").symlink_to(tmp_path / "run" / "0" / "1")
    started = time.monotonic()
    assert [o.key for o in store.list("run/0/")] == ["run/0/1"]
    assert store.get("run/0/2", 100) is None and store.get("run/0/3", 100) is None
    assert time.monotonic() - started < 5
