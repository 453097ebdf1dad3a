"""Fixtures of the trainables' tests: an S3-compatible object store (moto's server)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import free_port

#: moto's server, one request at a time. Threaded (``python -m moto.server``), it checks the
#: condition of a conditional PUT (If-None-Match, If-Match) and stores the object in two steps
#: that two threads can interleave; S3 does both at once, and so does moto in one thread.
MOTO = """
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
run_simple("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app),
           threaded=False)
"""


@pytest.fixture
def s3_uri(tmp_path, monkeypatch):
    """An ``s3://`` URI of a bucket on a moto server of our own (stopped by pid afterwards)."""
    import pyarrow.fs as pafs

    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1",
                               allow_bucket_creation=True)
        deadline = time.monotonic() + 180  # moto imports slowly on a busy machine
        while True:
            try:
                fs.create_dir("difftune-test")
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto died"
                time.sleep(0.2)
        # allow_delayed_open: small objects go up in one PutObject; moto 5.2.1 answers
        # CompleteMultipartUpload with a root tag pyarrow rejects (getmoto/moto#10055)
        yield f"s3://difftune-test/cache?endpoint_override=127.0.0.1:{port}&scheme=http" \
              f"&region=us-east-1&allow_delayed_open=true"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
