"""Fixtures of tests/cluster: the local stand-ins of a multi-node deployment
(cluster/README.md, "Local stand-ins"):

- a 2-node Ray cluster on this machine: ``ray start --head --block`` and a worker
  ``ray start --block --address=...``, each its own process tree with its own ``--temp-dir``,
  ``TMPDIR`` and custom resource (``head_node`` / ``worker_node``), token authentication on
  with one token file shared by every process (``RAY_AUTH_MODE=token``,
  ``RAY_AUTH_TOKEN_PATH``);
- ``mlflow server`` with a sqlite backend and a local artifact folder;
- moto's S3 server as the object store of the feature cache.

Every process is started here with ``start_new_session``, recorded by pid with the processes
it spawns, and stopped by pid in teardown (also when a test failed). Nothing is timed: every
wait polls until a generous deadline and then fails with the tail of the process's log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import free_port
from standin_kill_worker import sigkill  # cluster/: the stand-ins' own kill loop

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
#: what `ray job submit --working-dir .` ships from the repository: the job's working folder
#: (cluster/ holds the stand-in space file); the code that runs is the installed difftune
WORKING_DIR_PARTS = ("__init__.py", "search", "trainables", "spaces", "cluster",
                     "pyproject.toml", "README.md")
BUCKET = "difftune"
#: moto 5.2.1 answers CompleteMultipartUpload with a root tag pyarrow rejects
#: (getmoto/moto#10055): allow_delayed_open makes pyarrow PUT objects up to 5 MB at once
S3_QUERY = "scheme=http&region=us-east-1&allow_delayed_open=true"
START_TIMEOUT_S = 240.0  # one service starting on a loaded 2-core machine



def wait_for(what: str, check: Callable[[], Any], *, timeout: float = START_TIMEOUT_S,
             interval: float = 0.5, alive: Callable[[], str | None] | None = None) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds or
    as soon as ``alive`` reports a dead process (its message)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, ValueError, KeyError) as exc:
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        dead = alive() if alive else None
        if dead:
            pytest.fail(f"waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what} (last error: {last})")
        time.sleep(interval)


class Processes:
    """Processes this test session started, by name; each one's log is ``logs/NAME.log``."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.killed: dict[str, list[int]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        logger.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def dead(self, *names: str) -> str | None:
        """A message about the first of ``names`` that exited, else None."""
        for name in names:
            proc = self.procs[name]
            if proc.poll() is not None and name not in self.killed:
                return f"{name} exited with {proc.returncode}:\n{self.log(name)}"
        return None

    def tree(self, name: str) -> list[psutil.Process]:
        """The process ``name`` and everything it spawned that is still running."""
        try:
            root = psutil.Process(self.procs[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_tree(self, name: str) -> list[int]:
        """SIGKILL ``name`` and its descendants at once (a node losing power)."""
        procs = self.tree(name)
        sigkill(procs)
        self.procs[name].wait(timeout=30)
        self.killed[name] = [p.pid for p in procs]
        logger.info("killed %s: pids %s", name, self.killed[name])
        return self.killed[name]

    def stop(self, name: str, timeout: float = 60.0) -> None:
        """SIGTERM ``name`` (a ``ray start --block`` stops its node), then SIGKILL whatever of
        its tree, as it was just before, is left."""
        procs = self.tree(name)
        if not procs:
            return
        try:
            procs[0].send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
        _, alive = psutil.wait_procs(procs[:1], timeout=timeout)
        time.sleep(1.0)  # let the children it is stopping go
        sigkill([p for p in procs + [c for a in alive for c in _children(a)]
                  if p.is_running()])
        try:
            self.procs[name].wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not exit", name, self.procs[name].pid)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except Exception:  # stop the others whatever happens to one
                logger.exception("stopping %s", name)


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []



@dataclass
class StandIns:
    """Addresses and helpers of the running stand-ins."""

    root: Path
    env: dict[str, str]
    gcs_address: str
    dashboard: str
    tracking_uri: str
    s3_endpoint: str
    token: str
    procs: Processes
    ray_bin: str = "ray"
    node_ids: dict[str, str] = field(default_factory=dict)  # "head"/"worker" -> Ray node id

    @property
    def shared(self) -> Path:
        """The folder every node sees (declared in $DIFFTUNE_SHARED_PATHS)."""
        return self.root / "shared"

    @property
    def bucket(self) -> str:
        return BUCKET

    @staticmethod
    def wait_for(what: str, check: Callable[[], Any], **kw: Any) -> Any:
        """:func:`wait_for` (poll until truthy; fail after a generous timeout)."""
        return wait_for(what, check, **kw)

    def make_working_dir(self, dest: Path) -> Path:
        """A copy of the repository as ``ray job submit --working-dir .`` ships it."""
        return make_working_dir(dest)

    def cache_uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.s3_endpoint}&{S3_QUERY}"

    def node_env(self, role: str) -> dict[str, str]:
        """The environment of one node: its own TMPDIR, i.e. its own local disk."""
        tmp = self.root / f"tmp-{role}"
        tmp.mkdir(exist_ok=True)
        return {**self.env, "TMPDIR": str(tmp)}

    # ---- the dashboard's REST API (the job and state APIs), with the cluster's token
    def api(self, path: str, *, method: str = "GET", body: Any = None,
            token: str | None = None, timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.dashboard + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token is None:
            token = self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode() or "null")

    def nodes(self) -> list[dict]:
        """Every node the state API knows (alive and dead)."""
        reply = self.api("/api/v0/nodes?limit=100&detail=1")
        return reply["data"]["result"]["result"]

    def actors(self, class_name: str) -> list[dict]:
        """Actors of ``class_name`` (dead ones too: the GCS keeps their records)."""
        q = ("/api/v0/actors?limit=10000&detail=1&filter_keys=class_name"
             f"&filter_predicates=%3D&filter_values={class_name}")
        return self.api(q)["data"]["result"]["result"]

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        except (OSError, ValueError, KeyError) as exc:
            return f"(no logs: {exc})"

    def submit(self, submission_id: str, entrypoint: list[str], *, working_dir: Path,
               env_vars: dict[str, str] | None = None) -> None:
        """``ray job submit --no-wait`` (the CLI the README shows)."""
        argv = [self.ray_bin, "job", "submit", "--address", self.dashboard, "--submission-id",
                submission_id, "--working-dir", str(working_dir), "--no-wait"]
        if env_vars:
            argv += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        out = subprocess.run(argv + ["--", *entrypoint], env=self.env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, f"ray job submit failed:\n{out.stdout}\n{out.stderr}"

    def wait_job(self, submission_id: str, *, timeout: float = 900.0,
                 on_poll: Callable[[], None] | None = None, interval: float = 1.0,
                 status_every_s: float = 1.0) -> dict:
        """Poll the job until it ends; ``on_poll`` runs every ``interval`` seconds in between
        (e.g. to kill a node at the right moment)."""
        deadline = time.monotonic() + timeout
        next_status = 0.0
        while True:
            if time.monotonic() >= next_status:
                info = self.job(submission_id)
                if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                    return info
                if time.monotonic() > deadline:
                    pytest.fail(f"job {submission_id} still {info['status']} after "
                                f"{timeout:.0f} s:\n{self.job_logs(submission_id)[-6000:]}")
                next_status = time.monotonic() + status_every_s
            if on_poll is not None:
                on_poll()
            time.sleep(interval)


def make_working_dir(dest: Path) -> Path:
    """A copy of the package as ``ray job submit --working-dir`` ships it (no caches)."""
    dest.mkdir(parents=True)
    for part in WORKING_DIR_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / part)
    return dest


def ray_ports(head: bool) -> list[str]:
    """Explicit free ports for everything a node listens on, so that two nodes (and any
    other Ray on this machine) never collide."""
    argv = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    if head:
        argv.append(f"--ray-client-server-port={free_port()}")
    return argv


def http_ok(url: str, method: str = "GET") -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=10) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def stand_ins() -> Iterator[StandIns]:
    """Start Ray head + worker, mlflow server and moto; stop them all by pid afterwards."""
    # short: Ray's unix socket paths under --temp-dir must stay below ~107 characters
    root = Path(tempfile.mkdtemp(prefix="dtc", dir="/tmp"))
    logs = root / "logs"
    logs.mkdir()
    (root / "shared").mkdir()
    token_file = root / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTEST_")) and k not in ("TMPDIR",)}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
        # moto accepts any credentials; a real cluster takes them from the instance role
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    })
    procs = Processes(logs)
    gcs_port, dash_port, ml_port, s3_port = free_port(), free_port(), free_port(), free_port()
    s = StandIns(root=root, env=env, gcs_address=f"127.0.0.1:{gcs_port}",
                 dashboard=f"http://127.0.0.1:{dash_port}",
                 tracking_uri=f"http://127.0.0.1:{ml_port}", s3_endpoint=f"127.0.0.1:{s3_port}",
                 token=token, procs=procs,
                 ray_bin=shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray")
    ray_bin = s.ray_bin
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats"]
    try:
        # the three services start side by side; the worker joins once the head is up
        procs.start("head", [ray_bin, "start", "--head", f"--port={gcs_port}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                             '--resources={"head_node": 1}', f"--temp-dir={root / 'h'}",
                             *common, *ray_ports(head=True)], s.node_env("head"))
        procs.start("mlflow", [mlflow_bin, "server", "--backend-store-uri",
                               f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                               str(root / "artifacts"), "--host", "127.0.0.1", "--port",
                               str(ml_port), "--workers", "1"], env, cwd=root)
        procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(s3_port)], env, cwd=root)
        wait_for("the Ray head", lambda: "Ray runtime started" in procs.log("head"),
                 alive=lambda: procs.dead("head"))
        procs.start("worker", [ray_bin, "start", f"--address={s.gcs_address}",
                               "--node-ip-address=127.0.0.1", '--resources={"worker_node": 1}',
                               f"--temp-dir={root / 'w'}", *common, *ray_ports(head=False)],
                    s.node_env("worker"))

        def two_nodes() -> bool:
            alive = [n for n in s.nodes() if n["state"] == "ALIVE"]
            for n in alive:
                for role in ("head", "worker"):
                    if f"{role}_node" in n["resources_total"]:
                        s.node_ids[role] = n["node_id"]
            return len(alive) == 2 and len(s.node_ids) == 2

        wait_for("2 alive Ray nodes", two_nodes, interval=1.0,
                 alive=lambda: procs.dead("head", "worker"))
        wait_for("mlflow server /health", lambda: http_ok(f"{s.tracking_uri}/health"),
                 alive=lambda: procs.dead("mlflow"))
        # a bucket for the cache (moto needs no signature: a plain PUT creates it)
        wait_for("moto's S3", lambda: http_ok(f"http://{s.s3_endpoint}/{BUCKET}", "PUT"),
                 alive=lambda: procs.dead("moto"))
        yield s
    finally:
        procs.stop_all()
        if os.environ.get("DIFFTUNE_KEEP_STANDINS"):
            logger.warning("stand-in files kept in %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)




@dataclass
class TwoNodes:
    """A bare 2-node Ray cluster (no dashboard; token authentication): its GCS address, the Ray node ids
    of the head and the worker, and the processes (the worker can be killed)."""

    address: str
    env: dict[str, str]
    procs: Processes
    node_ids: dict[str, str]


NODE_IDS = """
import json, ray
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({{r: n["NodeID"] for n in alive for r in ("head", "worker")
                  if f"{{r}}_node" in n["Resources"]}}))
"""


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    """``ray start --head`` and a worker ``ray start --address=...`` (1 CPU each, custom
    resources ``head_node`` / ``worker_node``, their own ``--temp-dir``); stopped by pid."""
    root = Path(tempfile.mkdtemp(prefix="dt2n", dir="/tmp"))
    (root / "logs").mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "PYTEST_")) and k not in ("TMPDIR",)}
    token_file = root / "auth_token"  # token authentication, as the stand-ins' cluster
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    procs = Processes(root / "logs")
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    address = f"127.0.0.1:{free_port()}"
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
              "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    try:
        procs.start("head", [ray_bin, "start", "--head", f"--port={address.split(':')[1]}",
                             "--include-dashboard=false", '--resources={"head_node": 1}',
                             f"--temp-dir={root / 'h'}", *common, *ray_ports(head=True)], env)
        wait_for("the Ray head", lambda: "Ray runtime started" in procs.log("head"),
                 alive=lambda: procs.dead("head"))
        procs.start("worker", [ray_bin, "start", f"--address={address}",
                               '--resources={"worker_node": 1}', f"--temp-dir={root / 'w'}",
                               *common, *ray_ports(head=False)], env)

        def both() -> dict[str, str] | None:
            out = subprocess.run([sys.executable, "-c", NODE_IDS.format(address=address)],
                                 env=env, capture_output=True, text=True, timeout=120)
            ids = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
            return ids if len(ids) == 2 else None

        ids = wait_for("2 alive Ray nodes", both, interval=2.0,
                       alive=lambda: procs.dead("head", "worker"))
        yield TwoNodes(address, env, procs, ids)
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
