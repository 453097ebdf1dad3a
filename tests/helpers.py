"""Plain helpers shared by tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: moto accepts any credentials; pyarrow and boto read them from the environment
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str, monkeypatch) -> Iterator[str]:
    """A moto S3 server of our own on 127.0.0.1 with ``bucket`` created; yields the query
    every ``s3://`` URI on it needs (``endpoint_override=...&scheme=http&region=...``).
    Stopped by pid afterwards."""
    import pyarrow.fs as pafs

    port = free_port()
    with open(log_dir / "moto.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port),
                                   "-H", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
        for k, v in MOTO_ENV.items():
            monkeypatch.setenv(k, v)
        try:
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                                   region="us-east-1", allow_bucket_creation=True)
            deadline = time.monotonic() + 180  # moto imports slowly on a busy machine
            while True:
                try:
                    fs.create_dir(bucket)
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, "moto died"
                    time.sleep(0.2)
            # allow_delayed_open: small objects go up in one PutObject; moto 5.2.1 answers
            # CompleteMultipartUpload with a root tag pyarrow rejects (getmoto/moto#10055)
            yield (f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
                   "&allow_delayed_open=true")
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
