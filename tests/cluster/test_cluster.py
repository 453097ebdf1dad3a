"""A search across a real 2-node Ray cluster on this machine (the stand-ins of conftest.py):
token auth between the nodes, the feature cache on an S3 store shared by both nodes, the
addressability checks against the cluster's real node list, and the demo search submitted
with ``ray job submit --working-dir`` that loses its worker node in the middle of a trial and
still finishes with every trial recorded once and the champion registered.

Follows cluster/README.md, "Local stand-ins", step for step.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SPACE = "cluster/standin-space.yaml"  # relative to the repository (the job's working dir)
TRIALS, EPOCHS = 4, 4  # as in the space file
EXPERIMENT, MODEL_NAME = "cluster-standin", "difftune-cluster-standin"
TRAINABLE_ACTOR = "ImplicitFunc"  # the actor class Ray Tune runs a function trainable in


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def probe(stand_ins) -> dict:
    """tests/cluster/probe.py run as a Ray driver against the cluster."""
    s = stand_ins
    env = {**s.env, "DIFFTUNE_SHARED_PATHS": str(s.shared)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("probe.py")), "--address",
         s.gcs_address, "--cache", s.cache_uri("probe"), "--shared", str(s.shared),
         "--tracking-uri", s.tracking_uri],
        env=env, cwd=s.shared, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"probe failed:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rejected(stand_ins, probe: dict) -> subprocess.CompletedProcess:
    """``difftune search --address`` (this repository's code) joining the cluster with a Tune
    storage path that only this driver has (no $DIFFTUNE_SHARED_PATHS)."""
    s = stand_ins
    return subprocess.run(
        ["difftune", "search", "--address", s.gcs_address, "--space", str(REPO / SPACE),
         "--experiment", "cluster-rejected", "--tracking-uri", s.tracking_uri,
         "--storage", "/var/tmp/difftune-local/runs", "--cache", s.cache_uri("rejected")],
        env={**s.env}, cwd=s.root, capture_output=True, text=True,
        timeout=600)


@pytest.fixture(scope="module")
def resume_rejected(stand_ins, probe: dict) -> tuple[str, subprocess.CompletedProcess]:
    """``difftune search --resume`` joining the cluster for a search whose Ray Tune storage
    is a folder only this driver has (as when a laptop's search is resumed on a cluster)."""
    from difftune.search.records.tracking import start_parent_run
    from difftune.search.space.spec import load_space

    s = stand_ins
    parent = start_parent_run(MlflowClient(s.tracking_uri), "cluster-resume-rejected",
                              space_dict=load_space(str(REPO / SPACE)).resolved(),
                              runtime={"cache": s.cache_uri("resume")},
                              tune_path="/var/tmp/difftune-local/runs/resume-1",
                              model_name="difftune-cluster-resume-rejected")
    return parent, subprocess.run(
        ["difftune", "search", "--resume", "cluster-resume-rejected", "--address",
         s.gcs_address, "--tracking-uri", s.tracking_uri],
        env={**s.env}, cwd=s.root, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def search(stand_ins, probe: dict, rejected, resume_rejected) -> dict:
    """The demo search submitted as a Ray job; the worker node's processes are killed as soon
    as a trial on it has reported its first epoch (cluster/standin_kill_worker.py). Runs after
    the fixtures that need both nodes."""
    s = stand_ins
    wd = s.make_working_dir(s.root / "wd")
    storage = s.shared / "runs"
    job_id = "difftune-standin-search"
    s.submit(job_id, ["difftune", "search", "--space", SPACE, "--experiment", EXPERIMENT,
                      "--model-name", MODEL_NAME, "--tracking-uri", s.tracking_uri,
                      "--storage", str(storage), "--cache", s.cache_uri("search")],
             working_dir=wd, env_vars={"DIFFTUNE_SHARED_PATHS": str(s.shared)})
    # cluster/standin_kill_worker.py: kill the worker node once a trial on it is past its
    # first epoch (the README's step 3)
    killer = subprocess.Popen(
        [sys.executable, str(REPO / "cluster" / "standin_kill_worker.py"), "--head-temp-dir",
         str(s.root / "h"), "--dashboard", s.dashboard, "--worker-pid",
         str(s.procs.procs["worker"].pid), "--epochs", str(EPOCHS)],
        env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = s.wait_job(job_id, timeout=900)
        try:
            out, err = killer.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # it never caught a worker trial between epochs
            killer.kill()
            out, err = killer.communicate()
    finally:
        if killer.poll() is None:
            killer.kill()
            killer.communicate()
    logs = s.job_logs(job_id)
    kill = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    if kill:
        s.procs.killed["worker"] = kill["pids"]
        # the GCS declares a node dead once its health checks have failed for a while
        s.wait_for("the killed worker node marked DEAD", lambda: any(
            n["node_id"] == s.node_ids["worker"] and n["state"] == "DEAD" for n in s.nodes()),
            timeout=300, interval=2.0)
    client = MlflowClient(s.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    return {"info": info, "logs": logs, "kill": kill or {}, "killer_err": err,
            "client": client, "storage": storage,
            "parents": [r for r in runs if r.data.tags.get("difftune.role") == "search"],
            "children": [r for r in runs if r.data.tags.get("difftune.role") == "trial"],
            "actors": s.actors(TRAINABLE_ACTOR), "nodes": s.nodes()}


def _job_context(search: dict) -> str:
    return f"job {search['info'].get('status')}: {search['info'].get('message')}\n" \
           f"{search['logs'][-8000:]}"


# ----------------------------------------------------------------------------- the nodes


def test_two_nodes_with_their_own_resources_and_token_auth(stand_ins):
    s = stand_ins
    alive = {n["node_id"]: n for n in s.nodes() if n["state"] == "ALIVE"}
    assert set(s.node_ids.values()) <= set(alive)
    assert alive[s.node_ids["head"]]["is_head_node"]
    assert "worker_node" not in alive[s.node_ids["head"]]["resources_total"]
    assert "head_node" not in alive[s.node_ids["worker"]]["resources_total"]
    # the dashboard (jobs and state API) refuses a request without the cluster's token
    import urllib.error

    for token in ("", "0" * 64):
        with pytest.raises(urllib.error.HTTPError) as err:
            s.api("/api/v0/nodes?limit=1", token=token)
        assert err.value.code in (401, 403)


# ------------------------------------------------------------------- cache and checks


def test_cache_entries_written_on_one_node_are_read_on_the_other(probe: dict):
    writer, reader = probe["writer"], probe["reader"]
    assert probe["nodes"] == 2 and writer["node_id"] != reader["node_id"]
    assert writer["stats"]["forward_batches"] > 0 and writer["stats"]["entries_written"] == 1
    # the reader ran no U-Net: it fetched the writer's entry from the object store ...
    assert reader["stats"]["forward_batches"] == 0 and reader["stats"]["entries_written"] == 0
    assert reader["stats"]["entries_reused"] == 1
    # ... into its own node's disk (each node has its own TMPDIR here, as on separate hosts)
    assert writer["mirror"] != reader["mirror"] and reader["mirror_files"]
    assert set(reader["mirror_files"]) <= set(writer["mirror_files"])
    assert reader["rows"] == writer["rows"] > 0 and reader["sha"] == writer["sha"]


def test_addressability_checks_against_the_real_cluster(probe: dict):
    checks = probe["checks"]
    assert checks["shared"] == "ok" and checks["sqlite_in_shared"] == "ok"
    assert checks["not_shared"].startswith("--storage /var/tmp/difftune-local/runs is a local "
                                           "folder of the driver but the Ray cluster has 2 nodes")
    assert "\n" not in checks["not_shared"] and "s3://" in checks["not_shared"]
    assert checks["default_tracking"].startswith("--tracking-uri sqlite:///mlflow.db is a store")
    assert checks["inputs_present"] == "ok"
    assert checks["inputs_missing"].startswith("--data /nonexistent/imagenet is missing on 2 "
                                               "of 2 nodes")


def test_joining_the_cluster_with_a_local_storage_path_is_one_clear_error(rejected,
                                                                           stand_ins):
    assert rejected.returncode == 2, rejected.stdout[-3000:] + rejected.stderr[-3000:]
    (line,) = [x for x in rejected.stderr.splitlines() if x.startswith("difftune search:")]
    assert line.startswith("difftune search: error: --storage /var/tmp/difftune-local/runs is "
                           "a local folder of the driver but the Ray cluster has 2 nodes")
    assert "DIFFTUNE_SHARED_PATHS" in line and "s3://" in line
    # rejected before anything was recorded
    assert MlflowClient(stand_ins.tracking_uri).get_experiment_by_name("cluster-rejected") \
        is None


def test_resume_checks_the_stores_against_the_cluster_before_restarting(resume_rejected,
                                                                          stand_ins):
    parent, done = resume_rejected
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("difftune search:")]
    assert line.startswith("difftune search: error: --storage /var/tmp/difftune-local/runs is "
                           "a local folder of the driver but the Ray cluster has 2 nodes")
    run = MlflowClient(stand_ins.tracking_uri).get_run(parent)
    assert run.info.status == "RUNNING" and run.info.end_time is None  # nothing restarted


# ----------------------------------------------------------------------------- the search


def test_search_finishes_although_the_worker_died_mid_trial(search: dict, stand_ins):
    assert search["kill"], "no trial on the worker node was caught between epochs " \
        f"({search['killer_err'][-2000:]}):\n" + _job_context(search)
    assert search["info"]["status"] == "SUCCEEDED", _job_context(search)
    dead = {n["node_id"] for n in search["nodes"] if n["state"] == "DEAD"}
    assert stand_ins.node_ids["worker"] in dead
    (parent,) = search["parents"]
    assert parent.info.status == "FINISHED"


def test_trials_ran_on_both_nodes(search: dict, stand_ins):
    """Ray's own record: the trainable actors of the search and the node each lived on."""
    nodes = {a["node_id"] for a in search["actors"]}
    assert nodes == set(stand_ins.node_ids.values()), search["actors"]


def test_every_trial_is_recorded_exactly_once(search: dict):
    children = search["children"]
    (parent,) = search["parents"]
    assert len(children) == TRIALS, [c.data.tags for c in children]
    assert len({c.data.tags["difftune.trial_id"] for c in children}) == TRIALS, \
        [c.data.tags for c in children]
    client = search["client"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED", (child.info, child.data.tags)
        assert child.data.tags["hostname"] and child.data.tags["node_ip"], child.data.tags
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_top1")]
        assert steps == list(range(1, EPOCHS + 1)), (child.data.tags, steps)


def test_the_killed_trial_was_retried_from_its_checkpoint(search: dict):
    """FailureConfig(max_failures) retried the trial whose node died, in the same run."""
    killed = [c for c in search["children"]
              if c.data.tags["difftune.trial_id"] == search["kill"]["trial_id"]]
    assert len(killed) == 1, _job_context(search)
    tags = killed[0].data.tags
    assert int(tags.get("failures", 0)) >= 1 and tags.get("last_failure"), tags
    # restored at the epoch it had reached, not from scratch
    result = glob.glob(str(search["storage"] / "*" / f"trial_{search['kill']['trial_id']}"
                           / "result.json"))
    iterations = [json.loads(line)["training_iteration"]
                  for line in Path(result[0]).read_text().splitlines()]
    assert iterations[-1] == EPOCHS and len(iterations) <= EPOCHS + search["kill"]["epoch"]


def test_each_trial_run_names_the_ray_node_it_ran_on(search: dict, stand_ins):
    """The ``node_id`` tag (and ``failed_node_id`` of an attempt lost with its node)."""
    head, worker = stand_ins.node_ids["head"], stand_ins.node_ids["worker"]
    seen = set()
    for child in search["children"]:
        tags = child.data.tags
        assert tags.get("node_id") in (head, worker), \
            f"no node_id tag on the trial runs (needs the node_id diff): {tags}"
        seen |= {tags["node_id"], tags.get("failed_node_id")}
        if tags["difftune.trial_id"] == search["kill"]["trial_id"]:
            assert (tags["failed_node_id"], tags["node_id"]) == (worker, head), tags
    assert {head, worker} <= seen


def test_champion_is_registered(search: dict):
    client = search["client"]
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    best = max(search["children"], key=lambda r: r.data.metrics["val_top1"])
    assert version.run_id == best.info.run_id
    (parent,) = search["parents"]
    assert parent.data.tags["best_run_id"] == best.info.run_id


def test_search_cache_lives_in_the_object_store(search: dict, stand_ins):
    import pyarrow.fs as pafs

    from difftune.trainables.cache.admin import list_entries

    fs = pafs.S3FileSystem(endpoint_override=stand_ins.s3_endpoint, scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    bucket = stand_ins.bucket
    entries = list_entries(f"{bucket}/search", filesystem=fs)
    # trials read train and val; the champion's one evaluation at the end reads test
    assert entries and {e["split"] for e in entries} == {"train", "val", "test"}
    test_ts = {e["t"] for e in entries if e["split"] == "test"}
    assert len(test_ts) == 1, test_ts
    assert not [i for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/search",
                                                               recursive=True))
                if i.base_name == ".lock"]  # every lock released, also the dead node's
