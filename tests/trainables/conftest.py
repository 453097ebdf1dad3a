"""Fixtures of the trainables' tests: an S3-compatible object store (moto's server)."""

from __future__ import annotations

import pytest
from helpers import moto_s3


@pytest.fixture
def s3_uri(tmp_path, monkeypatch):
    """An ``s3://`` URI of a bucket on a moto server of our own, one request at a time (the
    lock tests race conditional writes on it); stopped by pid afterwards."""
    with moto_s3(tmp_path, "difftune-test", monkeypatch, threaded=False) as query:
        yield f"s3://difftune-test/cache?{query}"
