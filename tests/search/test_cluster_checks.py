"""difftune.search.run.cluster without a cluster: which settings a multi-node search rejects, how a folder
is declared shared, and the GPU fraction each head type gets (the real cluster is in
tests/cluster)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest

from difftune.search.run import cluster
from difftune.search.run.cluster import (
    ClusterError,
    check_addressable,
    is_shared_path,
    local_path_of_store,
    local_path_of_tracking,
    max_nodes,
    mount_of,
    trial_resources,
)
from difftune.trainables.errors import UserError
from difftune.trainables.heads import KINDS

ONE = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1"},
       {"NodeID": "b" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.2"}]
TWO = [{"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1"},
       {"NodeID": "c" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.3"}]
HTTP = "http://10.0.0.1:5000"


@pytest.fixture
def mounts(tmp_path, monkeypatch):
    """A mount table with / local and /mnt/efs on NFS (instead of this machine's)."""
    table = tmp_path / "mounts"
    table.write_text("overlay / overlay rw 0 0\n"
                     "fs-1.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0\n"
                     "tmpfs /mnt/efs/scratch tmpfs rw 0 0\n"
                     "10.0.0.9:/vol /mnt/with\\040space nfs rw 0 0\n")
    monkeypatch.setattr(cluster, "MOUNTS", str(table))
    monkeypatch.delenv(cluster.SHARED_PATHS_ENV, raising=False)
    return table


def test_one_alive_node_accepts_local_paths(mounts):
    check_addressable(storage_path="/home/u/runs", cache="/home/u/cache",
                      tracking_uri="sqlite:///mlflow.db", nodes=ONE, most_nodes=0)


def test_remote_stores_pass_on_a_cluster(mounts):
    check_addressable(storage_path="s3://bucket/runs", cache="gs://bucket/cache?x=1",
                      tracking_uri=HTTP, nodes=TWO)
    check_addressable(storage_path="/mnt/efs/runs", cache=None,
                      tracking_uri="postgresql://u@db:5432/mlflow",
                      artifact_location="s3://bucket/mlflow", nodes=TWO)


def test_one_alive_node_of_an_autoscaling_cluster_is_checked(mounts):
    """An autoscaling cluster starts with its head alone: the autoscaler's maximum counts."""
    with pytest.raises(ClusterError) as err:
        check_addressable(storage_path="/home/u/runs", cache=None, tracking_uri=HTTP,
                          nodes=ONE, most_nodes=9)
    assert str(err.value).startswith("--storage /home/u/runs") and \
        "1 node now and its autoscaler may add nodes (up to 9)" in str(err.value)
    check_addressable(storage_path="/home/u/runs", cache="/home/u/c",
                      tracking_uri="sqlite:///m.db", nodes=ONE, most_nodes=1)


def test_max_nodes_sums_the_node_types_of_the_autoscaler_config():
    def config(*counts):
        return SimpleNamespace(node_group_configs=[SimpleNamespace(max_count=c) for c in counts])

    assert max_nodes(config(1, 8)) == 9  # a head and up to 8 GPU workers
    assert max_nodes(config(1, -1)) == sys.maxsize  # a worker group without a maximum
    assert max_nodes(config()) == 0


@pytest.mark.parametrize("artifacts, ok", [
    (None, False), ("file:///home/u/mlartifacts/x", False), ("/home/u/art", False),
    ("s3://bucket/mlflow", True), ("gs://bucket/mlflow", True), ("/mnt/efs/mlartifacts", True),
])
def test_a_database_tracking_uri_on_a_cluster_needs_shared_artifacts(mounts, artifacts, ok):
    kwargs = dict(storage_path="s3://b/r", cache=None, nodes=TWO, artifact_location=artifacts,
                  tracking_uri="postgresql://mlflow:SECRET@db:5432/mlflow")
    if ok:
        check_addressable(**kwargs)
        return
    with pytest.raises(ClusterError) as err:
        check_addressable(**kwargs)
    msg = str(err.value)
    assert msg.startswith("--tracking-uri postgresql://***@db:5432/mlflow keeps no artifacts")
    assert "--artifact-location s3://" in msg and "SECRET" not in msg and "\n" not in msg


@pytest.mark.parametrize("setting, kwargs", [
    ("--storage /home/u/runs", dict(storage_path="/home/u/runs", cache=None, tracking_uri=HTTP)),
    ("--storage ./difftune_runs (the default)", dict(storage_path=None, cache=None, tracking_uri=HTTP)),
    ("--cache /home/u/cache", dict(storage_path="s3://b/r", cache="/home/u/cache",
                                   tracking_uri=HTTP)),
    ("--cache file:///home/u/cache", dict(storage_path="s3://b/r",
                                          cache="file:///home/u/cache", tracking_uri=HTTP)),
    ("--tracking-uri sqlite:////home/u/mlflow.db",
     dict(storage_path="s3://b/r", cache=None, tracking_uri="sqlite:////home/u/mlflow.db")),
    ("--tracking-uri mlruns", dict(storage_path="s3://b/r", cache=None, tracking_uri="mlruns")),
])
def test_a_local_path_on_a_cluster_is_one_clear_error(mounts, setting, kwargs):
    with pytest.raises(ClusterError) as err:
        check_addressable(nodes=TWO, **kwargs)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith(setting) and "has 2 nodes;" in msg and "allowed:" in msg
    assert cluster.SHARED_PATHS_ENV in msg


def test_every_offending_setting_is_named_in_one_line(mounts):
    with pytest.raises(ClusterError) as err:
        check_addressable(storage_path="/a", cache="/b", tracking_uri="sqlite:////c.db",
                          nodes=TWO)
    msg = str(err.value)
    assert "\n" not in msg
    assert [p.split()[0] for p in msg.split(". ")] == ["--storage", "--cache", "--tracking-uri"]


def test_network_mounts_are_shared_and_the_deepest_mount_wins(mounts):
    assert mount_of("/mnt/efs/runs/x") == ("/mnt/efs", "nfs4")
    assert is_shared_path("/mnt/efs/runs/x") and is_shared_path("/mnt/with space/a")
    assert not is_shared_path("/mnt/efs/scratch/a")  # a local tmpfs mounted inside
    assert not is_shared_path("/mnt/efsx")  # a prefix of the name is not a parent folder
    check_addressable(storage_path="/mnt/efs/runs", cache="/mnt/efs/cache",
                      tracking_uri="sqlite:////mnt/efs/mlflow.db", nodes=TWO)


def test_declared_shared_prefixes(mounts, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    monkeypatch.setenv(cluster.SHARED_PATHS_ENV, f"/nowhere:{shared}")
    check_addressable(storage_path=str(shared / "runs"), cache=f"file://{shared}/cache",
                      tracking_uri=f"sqlite:///{shared}/mlflow.db", nodes=TWO)
    with pytest.raises(ClusterError, match=r"^--storage"):
        check_addressable(storage_path=str(tmp_path / "sharedx"), cache=None,
                          tracking_uri=HTTP, nodes=TWO)
    # a relative path is resolved against the driver's working directory
    monkeypatch.chdir(shared.parent)
    check_addressable(storage_path="shared/runs", cache=None, tracking_uri=HTTP, nodes=TWO)
    # the env argument wins over os.environ
    with pytest.raises(ClusterError):
        check_addressable(storage_path=str(shared), cache=None, tracking_uri=HTTP, nodes=TWO,
                          env={})


def test_a_relative_declared_prefix_is_rejected(mounts, monkeypatch):
    monkeypatch.setenv(cluster.SHARED_PATHS_ENV, "shared")
    with pytest.raises(ClusterError, match=r"DIFFTUNE_SHARED_PATHS entry 'shared'"):
        check_addressable(storage_path="/x", cache=None, tracking_uri=HTTP, nodes=TWO)


def test_without_a_mount_table_only_declared_paths_are_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "MOUNTS", str(tmp_path / "missing"))
    monkeypatch.delenv(cluster.SHARED_PATHS_ENV, raising=False)
    assert mount_of("/x") is None and not is_shared_path("/x")


@pytest.mark.parametrize("uri, path", [
    ("sqlite:///mlflow.db", "mlflow.db"), ("sqlite:////abs/m.db", "/abs/m.db"),
    ("sqlite://", ":memory:"), ("file:///abs/mlruns", "/abs/mlruns"), ("mlruns", "mlruns"),
    ("/abs/mlruns", "/abs/mlruns"), ("http://h:5000", None), ("https://h", None),
    ("databricks", None), ("postgresql://u:p@h/db", None), ("mysql+pymysql://h/db", None),
])
def test_tracking_uris(uri, path):
    assert local_path_of_tracking(uri) == path


@pytest.mark.parametrize("value, path", [
    ("runs", "runs"), ("/abs/runs", "/abs/runs"), ("file:///abs/runs", "/abs/runs"),
    ("s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http", None), ("gs://b/p", None),
    ("hdfs://nn:8020/p", None), ("abfs://c@a.dfs.core.windows.net/p", None),
])
def test_store_uris(value, path):
    assert local_path_of_store(value) == path


def test_gpus_per_trial_set_by_the_space_is_used_for_every_trial():
    search = {"cpus_per_trial": 4, "gpus_per_trial": 0.25}
    assert trial_resources(search, gpus_available=8) == {"cpu": 4.0, "gpu": 0.25}
    assert trial_resources({**search, "gpus_per_trial": 0}, gpus_available=8) == \
        {"cpu": 4.0, "gpu": 0.0}


def test_unset_gpus_follow_the_head_type_on_a_gpu_cluster():
    res = trial_resources({"cpus_per_trial": 2, "gpus_per_trial": None}, gpus_available=4)
    assert callable(res)
    assert res({"head": "linear", "block": 24}) == {"cpu": 2.0, "gpu": 0.1}
    assert res({"head": "mlp", "mlp:hidden": "[256]"})["gpu"] == 0.1
    assert res({"head": "attention"})["gpu"] == 0.25
    assert res({"head": "difformer", "difformer:blocks@19": True})["gpu"] == 0.5
    assert res({"head": "diffeed"})["gpu"] == 1.0
    assert res({"block": 3})["gpu"] == KINDS["linear"].gpus  # TrialConfig's default head
    assert pickle.loads(pickle.dumps(res))({"head": "diffeed"})["gpu"] == 1.0
    gpus = {k: v.gpus for k, v in KINDS.items()}
    assert gpus["linear"] < gpus["attention"] <= gpus["difformer"] < gpus["diffeed"] == 1.0


def test_unset_gpus_on_a_cpu_cluster_are_zero():
    assert trial_resources({"cpus_per_trial": 1, "gpus_per_trial": None},
                           gpus_available=0) == {"cpu": 1.0, "gpu": 0.0}


#: a Ray of its own with two (declared) GPUs: a trial of each head type reports the
#: resources Ray gave it (the test process's own Ray has no GPUs)
PER_HEAD_TRIALS = """
import json, sys
import ray
from ray import tune
from difftune.search.run.cluster import trial_resources

def trainable(config):
    got = ray.get_runtime_context().get_assigned_resources()
    tune.report({"gpu": got.get("GPU", 0.0), "cpu": got.get("CPU", 0.0)})

ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
         logging_level="ERROR", log_to_driver=False)
res = trial_resources({"cpus_per_trial": 1, "gpus_per_trial": None}, gpus_available=2)
tuner = tune.Tuner(tune.with_resources(trainable, res),
                   param_space={"head": tune.grid_search(["linear", "difformer", "diffeed"])},
                   run_config=tune.RunConfig(storage_path=sys.argv[1], verbose=0))
out = {r.config["head"]: [r.metrics["cpu"], r.metrics["gpu"]] for r in tuner.fit()}
print(json.dumps(out))
ray.shutdown()
"""


@pytest.mark.slow
def test_each_trial_gets_its_heads_gpu_share_from_ray(tmp_path):
    """tune.with_resources takes the per-head function: on a real Ray, each trial runs with
    the GPU fraction of its head type."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    run = subprocess.run([sys.executable, "-c", PER_HEAD_TRIALS, str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {"linear": [1.0, 0.1], "difformer": [1.0, 0.5], "diffeed": [1.0, 1.0]}
