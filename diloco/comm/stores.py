"""Object stores that a permissionless peer exchange posts to.

Templar-style: every peer puts its payload into a shared bucket and gets the others'. Keys are
'/'-separated strings relative to the store's root (a directory) or prefix (in a bucket).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_TMP = ".tmp-"


class StoreError(RuntimeError):
    """The store cannot be used: unreachable, bad credentials, missing bucket (one line)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the store), size in bytes and mtime (epoch s)."""

    key: str
    size: int
    mtime: float


class Store(Protocol):
    """What a peer exchange needs from an object store."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Stores data under key atomically: readers never see a partial object."""

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """Returns the object, or None if missing or larger than max_bytes (reads <= max+1)."""

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Returns every object whose key starts with prefix (recursive), sorted by key."""

    def check(self) -> None:
        """Raises StoreError (one line, naming the url and what is wrong) if unusable."""


def _check_key(key: str, *, prefix: bool = False) -> None:
    """Rejects keys (or list prefixes) that could escape the root or are not plain '/' paths."""
    parts = key.split("/")
    if prefix:
        parts = parts[:-1]  # a prefix may end in '/' or in a partial name
    if key.startswith("/") or ".." in key or "\\" in key or any(p in ("", ".") for p in parts):
        raise ValueError(f"invalid store key {key!r}: want a relative '/' path without '..'")


class FileStore:
    """A directory tree; a put is a write to a '.tmp-' file then an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = self.root.absolute().as_uri()

    def _path(self, key: str) -> Path:
        _check_key(key)
        if key.rsplit("/", 1)[-1].startswith(_TMP):
            raise ValueError(f"invalid store key {key!r}: names starting {_TMP!r} are reserved")
        return self.root.joinpath(*key.split("/"))

    def put(self, key: str, data: bytes) -> None:
        """Writes a temp file next to the target, then renames it over the target."""
        path = self._path(key)
        tmp = path.parent / f"{_TMP}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"{self.url}: cannot put {key!r}: {e.strerror or e}") from e

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """Reads at most max_bytes + 1 bytes; None if missing or too large."""
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        try:  # never a FIFO, device or link someone put in a shared directory: no hang
            fd = os.open(self._path(key), flags)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink
                return None
            raise StoreError(f"{self.url}: cannot get {key!r}: {e.strerror or e}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "rb") as f:
                fd = -1
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot get {key!r}: {e.strerror or e}") from e
        finally:
            if fd >= 0:
                os.close(fd)
        return None if len(data) > max_bytes else data

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Walks only the directory the prefix pins down, skipping temp files."""
        _check_key(prefix, prefix=True)
        start = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        out: list[ObjectInfo] = []
        for dirpath, _, files in os.walk(self.root / start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if name.startswith(_TMP) or not key.startswith(prefix):
                    continue
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # replaced or removed while walking
                if not stat.S_ISREG(st.st_mode):
                    continue  # a FIFO, socket, device or link is not an object
                out.append(ObjectInfo(key, st.st_size, st.st_mtime_ns / 1e9))
        return sorted(out, key=lambda o: o.key)

    def check(self) -> None:
        """Creates the root if needed and writes (then removes) a probe file in it."""
        probe = self.root / f"{_TMP}check-{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"{self.url}: cannot write to {self.root}: {e.strerror or e}") from e


def _drop_expect(request: Any, **_: Any) -> None:
    request.headers.pop("Expect", None)


class S3Store:
    """An S3 (or S3-compatible) bucket and key prefix, through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        try:
            import boto3
            import botocore.exceptions
            from botocore.config import Config
        except ImportError as e:
            raise StoreError(
                f"{self.url}: boto3 is missing; pip install boto3 (or the `bucket` extra)"
            ) from e
        self._exc: Any = botocore.exceptions
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        self._s3: Any = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.endpoint = endpoint_url or self._s3.meta.endpoint_url
        # botocore's Expect: 100-continue handling poisons a pooled connection when the server
        # answers before the body is sent (SeaweedFS does for an empty put): the next put stalls
        # for read_timeout, then retries (boto/botocore#3755). The header is unsigned: safe to drop.
        self._s3.meta.events.register("before-send.s3", _drop_expect)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turns any botocore error into a one-line StoreError."""
        try:
            yield
        except (self._exc.ClientError, self._exc.BotoCoreError) as e:
            raise StoreError(f"{self.url}: {what}: {self._explain(e)}") from e

    def _explain(self, e: Exception) -> str:
        if isinstance(e, self._exc.ConnectionError):
            return f"cannot reach {self.endpoint}"
        if isinstance(e, self._exc.ReadTimeoutError):
            return f"{self.endpoint} did not answer in time"
        if isinstance(e, self._exc.NoCredentialsError):
            return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        if isinstance(e, self._exc.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return f"bad credentials ({code})"
            if code in ("404", "NoSuchBucket"):
                return f"bucket {self.bucket} does not exist"
            return f"{code}: {err.get('Message', '')}".strip(": ")
        return " ".join(str(e).split())

    def put(self, key: str, data: bytes) -> None:
        """One put_object, which S3 makes visible atomically."""
        _check_key(key)
        with self._errors(f"cannot put {key!r}"):
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """A Range read of the first max_bytes + 1 bytes; None if missing or too large."""
        _check_key(key)
        req = {"Bucket": self.bucket, "Key": self._key(key)}
        with self._errors(f"cannot get {key!r}"):
            try:
                resp = self._s3.get_object(**req, Range=f"bytes=0-{max_bytes}")
            except self._exc.ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    return None
                if code != "InvalidRange":
                    raise
                resp = self._s3.get_object(**req)  # empty objects have no byte 0 to range over
            with contextlib.closing(resp["Body"]) as body:
                data: bytes = body.read(max_bytes + 1)
        return None if len(data) > max_bytes else data

    def list(self, prefix: str) -> list[ObjectInfo]:
        """ListObjectsV2 under the store prefix; keys come back relative to it."""
        _check_key(prefix, prefix=True)
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[ObjectInfo] = []
        with self._errors(f"cannot list {prefix!r}"):
            pages = self._s3.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for o in page.get("Contents", []):
                    key = o["Key"][len(base) :]
                    out.append(ObjectInfo(key, int(o["Size"]), o["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.key)

    def check(self) -> None:
        """head_bucket: the endpoint answers, the credentials are good, the bucket exists."""
        with self._errors("unusable"):
            self._s3.head_bucket(Bucket=self.bucket)


def open_store(url: str, endpoint_url: str | None = None, timeout_s: float = 10.0) -> Store:
    """Opens file:///abs, file://rel or a plain path as a FileStore, s3://bucket/prefix as S3."""
    if url.startswith("file://"):
        if url[len("file://") :]:
            return FileStore(Path(url[len("file://") :]))
    elif url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if bucket:
            return S3Store(bucket, prefix, endpoint_url=endpoint_url, timeout_s=timeout_s)
    elif url and "://" not in url:
        return FileStore(Path(url))
    raise ValueError(
        f"unsupported store url {url!r}: want file://PATH, a plain path or s3://BUCKET/PREFIX"
    )
