"""Local stand-ins (cluster/README.md): lose the worker node in the middle of a trial.

Run it right after submitting the search. It waits until a trial running on the worker node
has reported its first epoch but not its last, then kills the worker node's whole process tree
at once (SIGKILL: a node losing power; ``ray stop`` would stop every node of the machine) and
prints what it did as one JSON line: the trial, the epoch it had reached, the pids killed.
tests/cluster/test_cluster.py uses it the same way.

Which trial runs where: the pid in each Tune result, as the driver writes the results to its
staging folder on the head's disk (``HEAD_TEMP_DIR/session_*/artifacts/*/*/driver_artifacts/
trial_*/result.json``, one flushed line per result), against the pids of the trainable actors
that the state API places on the worker node. Epochs on cached features take milliseconds, so
the staging files are read every 20 ms. Exit code 1 when no such moment came before
``--timeout``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import psutil

TRAINABLE_ACTOR = "ImplicitFunc"  # the actor class Ray Tune runs a function trainable in


def _token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return Path(path).read_text().strip() if os.path.isfile(path) else ""


class StateApi:
    """The state API of the dashboard's REST interface, with the cluster's token."""

    def __init__(self, dashboard: str):
        self.dashboard, self.token = dashboard.rstrip("/"), _token()

    def get(self, path: str) -> list[dict]:
        req = urllib.request.Request(self.dashboard + path)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read().decode())["data"]["result"]["result"]

    def node_with(self, resource: str) -> str | None:
        for node in self.get("/api/v0/nodes?limit=100&detail=1"):
            if node["state"] == "ALIVE" and resource in node["resources_total"]:
                return node["node_id"]
        return None

    def actor_pids(self, node_id: str) -> set[int]:
        actors = self.get("/api/v0/actors?limit=10000&detail=1&filter_keys=class_name"
                          f"&filter_predicates=%3D&filter_values={TRAINABLE_ACTOR}")
        return {int(a["pid"]) for a in actors
                if a["node_id"] == node_id and a["state"] == "ALIVE"}


def sigkill(procs: list[psutil.Process]) -> None:
    """SIGKILL every process of ``procs`` at once (gone ones are skipped) and reap them."""
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and everything it started, at once; returns the pids."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    sigkill(procs)
    return [p.pid for p in procs]


def watch(args: argparse.Namespace) -> dict | None:
    api = StateApi(args.dashboard)
    pattern = str(Path(args.head_temp_dir) / "session_2*" / "artifacts" / "*" / "*"
                  / "driver_artifacts" / "trial_*" / "result.json")
    deadline = time.monotonic() + args.timeout
    node_id, pids, files, next_lookup = None, set(), [], 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_lookup:  # the expensive look-ups, twice a second
            next_lookup = time.monotonic() + 0.5
            try:
                node_id = node_id or api.node_with(args.worker_resource)
                if node_id and not pids:
                    pids = api.actor_pids(node_id)
            except OSError:
                pass  # the dashboard is busy; ask again
            files = glob.glob(pattern)
        for path in files if pids else ():
            try:
                last = json.loads(Path(path).read_text().splitlines()[-1])
            except (OSError, ValueError, IndexError):
                continue  # no result yet, or a line half written
            if last.get("pid") in pids and 1 <= last.get("training_iteration", 0) < args.epochs:
                return {"trial_id": last["trial_id"], "epoch": last["training_iteration"],
                        "worker_node_id": node_id, "pids": kill_tree(args.worker_pid)}
        time.sleep(0.02)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-temp-dir", required=True, help="the head node's --temp-dir")
    ap.add_argument("--dashboard", required=True, help="e.g. http://127.0.0.1:8266")
    ap.add_argument("--worker-pid", type=int, required=True,
                    help="pid of the worker node's `ray start --block`")
    ap.add_argument("--epochs", type=int, required=True, help="epochs of every trial")
    ap.add_argument("--worker-resource", default="worker_node",
                    help="the custom resource only the worker node has")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    done = watch(args)
    print(json.dumps(done))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
