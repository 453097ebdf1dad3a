"""The feature cache's cross-process lock (trainables/cache/lock.py) on a local folder and on
S3 (moto): an exclusive create that two racing processes cannot both win, a heartbeat that
never writes over a lock its holder no longer holds, and stale locks taken over once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difftune.trainables.cache.lock import CacheLock, FileLock
from difftune.trainables.cache.lock_backends import S3Lock
from difftune.trainables.cache.store import Store

REPO = Path(__file__).resolve().parents[2]
REL = "group/.lock"

#: one of two processes that take the lock ``rounds`` times, logging when they enter and
#: leave. They contend for certain: the first to hold it stays inside until the other says
#: (through the lock's own "waiting" log line) that it waits.
RACER = r"""
import json, logging, os, sys, time
from difftune.trainables.cache.lock import CacheLock
from difftune.trainables.cache.store import Store
spec = json.loads(sys.argv[1])
me, peer, flags = spec["me"], 1 - spec["me"], spec["barrier"]

def flag(name):
    open(os.path.join(flags, name), "w").close()

def seen(name):
    return os.path.exists(os.path.join(flags, name))

class Waiting(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("waiting for another process"):
            flag(f"waiting-{me}")

log = logging.getLogger("difftune.trainables.cache.lock")
log.setLevel(logging.INFO)
log.addHandler(Waiting())
store = Store(spec["root"])
flag(f"ready-{me}")
while not seen(f"ready-{peer}"):
    time.sleep(0.002)
waits = 0
for r in range(spec["rounds"]):
    with CacheLock(store, spec["rel"], stale_s=60.0) as lock:
        with open(spec["log"], "a") as f:
            f.write(f"enter {me}\n")
        deadline = time.monotonic() + 120
        while r == 0 and not (seen(f"waiting-{peer}") or seen(f"first-{peer}")):
            assert time.monotonic() < deadline, "the other process never asked for the lock"
            time.sleep(0.01)
        time.sleep(0.02)
        with open(spec["log"], "a") as f:
            f.write(f"leave {me}\n")
    if r == 0:
        flag(f"first-{me}")
    waits += lock.waited
print("WAITS", waits)
"""


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A cache root: a local folder, or a bucket prefix on moto."""
    if request.param == "local":
        return str(tmp_path / "cache")
    return request.getfixturevalue("s3_uri")


def race(root: str, tmp_path: Path, rounds: int = 8) -> list[str]:
    barrier, log = tmp_path / "barrier", tmp_path / "log"
    barrier.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-c", RACER, json.dumps({"root": root, "rel": REL, "me": i,
                                                  "rounds": rounds, "barrier": str(barrier),
                                                  "log": str(log)})],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    waits = 0
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        waits += int(out.split("WAITS")[-1])
    assert waits > 0  # they did contend (see RACER)
    return log.read_text().splitlines()


def test_two_racing_processes_never_hold_the_lock_together(root, tmp_path):
    lines = race(root, tmp_path)
    assert len(lines) == 2 * 2 * 8
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("enter ") and leave == "leave " + enter.split()[1], lines
    assert not Store(root).files("group")  # released, no debris


def replace_lock(store: Store, owner: dict) -> None:
    """Another process's lock where ours was (as a waiter that judged ours stale leaves it)."""
    if store.local:
        os.rename(store.path(REL), store.path(REL) + ".gone")
        Path(store.path(REL)).write_text(json.dumps(owner))
    else:
        store.put(REL, json.dumps(owner).encode())


def test_the_heartbeat_never_writes_over_a_lock_taken_over(root):
    store = Store(root)
    other = {"pid": 1, "host": "elsewhere|pid:[1]", "token": "other"}
    lock = CacheLock(store, REL, stale_s=0.4)  # beats every 0.1 s
    with lock:
        replace_lock(store, other)
        before = store.info(REL).mtime_ns
        deadline = time.monotonic() + 60
        while not lock.lost:
            assert time.monotonic() < deadline, "the holder never noticed"
            time.sleep(0.05)
        time.sleep(0.3)  # beats it would have sent, had it not stopped
        assert store.read_json(REL) == other and store.info(REL).mtime_ns == before
    assert store.read_json(REL) == other  # leaving does not delete the other's lock


def test_every_beat_is_a_new_version_of_the_lock(root):
    """A waiter takes over a lock it judged stale only if it is still the version it judged:
    a refresh must change that version (the ETag on S3, the mtime on disk)."""
    store = Store(root)
    lock = CacheLock(store, REL, stale_s=3600.0)
    with lock:
        first = lock.backend.read()
        time.sleep(0.01)  # an mtime step the filesystem can see
        assert lock.beat()
        second = lock.backend.read()
        assert second.version != first.version and second.owner["token"] == lock.owner["token"]
        assert not lock.backend.take_over(first, b"{}")  # the judged version is gone
        assert store.read_json(REL)["token"] == lock.owner["token"]
    assert store.info(REL).type.name == "NotFound"


def test_a_stale_lock_of_a_dead_holder_elsewhere_is_taken_over(root):
    store = Store(root)
    store.put(REL, json.dumps({"pid": 1, "host": "elsewhere|pid:[1]", "token": "x"}).encode())
    lock = CacheLock(store, REL, stale_s=1.0)
    with lock:
        assert lock.waited and store.read_json(REL)["token"] == lock.owner["token"]
    assert store.info(REL).type.name == "NotFound"


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    store = Store(str(tmp_path))
    probe = CacheLock(store, REL, stale_s=3600.0)
    store.put(REL, json.dumps({**probe.owner, "pid": int(dead.stdout), "token": "x"}).encode())
    with probe:  # stale_s is an hour: only the dead pid makes it stale
        assert probe.waited and store.read_json(REL)["token"] == probe.owner["token"]


def test_backends_by_store(tmp_path, s3_uri):
    assert isinstance(CacheLock(Store(str(tmp_path)), REL, 1).backend, FileLock)
    assert isinstance(CacheLock(Store(s3_uri), REL, 1).backend, S3Lock)
