"""Ray Tune's storage as an object-store URI with a query string (``s3://bucket/runs?
endpoint_override=...``): the search runs, and the Tune path it records (what ``--resume``
restores from) keeps the query at the end, on a real moto S3 server."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from helpers import moto_s3
from mlflow.tracking import MlflowClient
from ray import tune

from difftune.search.cli import main
from difftune.search.records.uris import storage_join

BUCKET = "difftune-runs"


def test_storage_join_keeps_a_query_at_the_end():
    assert storage_join("s3://b/runs?region=x&scheme=http", "e-1") == \
        "s3://b/runs/e-1?region=x&scheme=http"
    assert storage_join("s3://b/runs/", "e-1") == "s3://b/runs/e-1"
    assert storage_join("/shared/runs/", "e-1") == "/shared/runs/e-1"


@pytest.mark.slow
def test_search_with_a_query_string_storage_uri_records_a_restorable_path(
        ray_session, tmp_path, monkeypatch):
    with moto_s3(tmp_path, BUCKET, monkeypatch) as query:
        storage = f"s3://{BUCKET}/runs?{query}"
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        rc = main(["search", "--trials", "1", "--set", "head=linear", "--set", "epochs=1",
                   "--experiment", "qs", "--tracking-uri", uri, "--storage", storage,
                   "--cache", str(tmp_path / "cache")])
        assert rc == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("qs")
        (parent,) = client.search_runs([exp.experiment_id],
                                       filter_string="tags.`difftune.role` = 'search'")
        tune_path = parent.data.tags["difftune.tune_path"]
        base, _, got_query = tune_path.partition("?")
        assert got_query == query
        name = base.rsplit("/", 1)[1]
        assert base == f"s3://{BUCKET}/runs/{name}" and name.startswith("qs-")
        assert tune.Tuner.can_restore(tune_path)  # what --resume opens
        fs, path = pafs.FileSystem.from_uri(tune_path)
        assert fs.get_file_info(path).type == pafs.FileType.Directory
