"""A full disk under the feature cache (issue 22): not transient, so the first trial that
meets it stops the search with one line naming the path and what to do, and nothing is left
half-written; the plan warns when a given budget exceeds what the disk can hold."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.trainables.cache import entry
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.config import TrialConfig
from difftune.trainables.trainable import failure_kind, failure_message

SPACE = """
model: demo
search: {trials: 3, seed: 0, max_concurrent: 1, grace_period: 1, cpus_per_trial: 1}
fixed: {head: linear, epochs: 1, batch_size: 128, pool: 1, t: 10, momentum: 0.9}
params:
  block: {choice: [7, 10]}
"""


def test_a_full_disk_is_a_failure_of_its_own_with_one_line_naming_the_path():
    full = OSError(errno.ENOSPC, "No space left on device", "/cache/x.arrow")
    wrapped = RuntimeError("writing an entry")
    wrapped.__cause__ = full
    assert failure_kind(full) == failure_kind(wrapped) == "disk"
    assert failure_kind(OSError(errno.EIO, "I/O error")) is None  # transient: retried
    line = failure_message(wrapped, "disk", cache="/cache")
    assert "\n" not in line and "/cache/x.arrow" in line and "--cache-budget" in line
    # pyarrow's error carries no filename: the cache root stands in
    arrow = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert failure_kind(arrow) == "disk"
    assert "/the/cache" in failure_message(arrow, "disk", cache="/the/cache")


def test_a_miss_on_a_full_disk_publishes_nothing(tmp_path, monkeypatch):
    """The writer fails as a full disk does: the error reaches the trial as a disk failure and
    no entry (nor a temporary file) is left in the cache."""
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache"))

    monkeypatch.setattr(entry.EntryWriter, "write", no_space)
    cache = FeatureCache(str(tmp_path / "cache"))
    cfg = TrialConfig(head="linear", block=7, t=10, pool=1, epochs=1)
    with pytest.raises(OSError) as caught:
        cache.prepare(cfg, [(10, 7, 1)])
    assert failure_kind(caught.value) == "disk"
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".arrow", ".json") or ".tmp" in p.name], files


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 kB tmpfs (root can mount one; elsewhere the test is skipped: the simulated
    full disk above still runs)."""
    mount = Path(f"/tmp/difftune-full-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
    shutil.rmtree(mount, ignore_errors=True)


def test_search_on_a_full_disk_stops_at_the_first_trial_with_one_line(ray_session, tmp_path,
                                                                      tiny_disk, capsys,
                                                                      caplog):
    space = tmp_path / "s.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    address = ray_session.get_runtime_context().gcs_address
    rc = main(["search", "--space", str(space), "--experiment", "full", "--tracking-uri", uri,
               "--storage", str(tmp_path / "runs"), "--cache", str(tiny_disk / "cache"),
               "--address", address])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("difftune search: failed: the disk is full writing "), err[-3000:]
    assert str(tiny_disk / "cache") in last and "--cache-budget" in last
    assert "Trial task failed" not in err and "Traceback" not in err
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("full")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("difftune.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("difftune.role") == "trial"]
    assert parent.info.status == "FAILED" and "disk is full" in parent.data.tags[
        "difftune.failure"]
    assert sum(r.data.tags.get("failure") == "disk" for r in trials) == 1  # stopped at it
    assert len(trials) < 3
    leftovers = [p for p in (tiny_disk / "cache").rglob("*") if p.is_file()
                 and (".tmp" in p.name or p.name.startswith("."))]
    assert not leftovers
    rc = main(["plan", "--space", str(space), "--cache", str(tiny_disk / "cache"),
               "--cache-budget", "10GB"])
    assert rc == 0 and "exceeds what the cache's disk can hold" in caplog.text
