"""No credential reaches MLflow or the terminal: URIs are recorded and printed redacted."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from difftune.search.space import load_space
from difftune.search.tracking import TAG_RUNTIME, start_parent_run
from difftune.search.uris import redact


def test_redact_masks_userinfo_and_secret_query_values():
    assert redact("http://alice:s3cr3t@mlflow.example:5000") == "http://***@mlflow.example:5000"
    got = redact("s3://bucket/cache?access_key=AKIA123&secret_key=abc&region=us-east-1"
                 "&session_token=zzz&endpoint_override=127.0.0.1:9000")
    assert "AKIA123" not in got and "abc" not in got and "zzz" not in got
    assert "region=us-east-1" in got and "endpoint_override=127.0.0.1" in got
    assert redact("/local/folder") == "/local/folder"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_parent_run_records_the_cache_uri_without_its_keys(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    secret = "s3://b/c?access_key=AKIAXXXX&secret_key=VERYSECRET"
    run_id = start_parent_run(client, "sec", space_dict=load_space("demo").resolved(),
                              runtime={"cache": secret}, tune_path=str(tmp_path),
                              model_name="m")
    run = client.get_run(run_id)
    recorded = json.dumps({**run.data.tags, **run.data.params})
    assert "VERYSECRET" not in recorded and "AKIAXXXX" not in recorded
    assert json.loads(run.data.tags[TAG_RUNTIME])["cache"].startswith("s3://b/c?")
