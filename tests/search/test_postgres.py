"""The production tracking store: a real PostgreSQL (Debian's ``postgresql`` package, on
127.0.0.1) behind a real ``mlflow server``, and as a database tracking URI of its own: a
search, export and train against it, database URIs checked before anything starts, and no
password saved anywhere or put on a command line."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import free_port
from mlflow.tracking import MlflowClient

from difftune.search.cli import main

PASSWORD = "pg-Secret-7f3a"
#: set by .ci/run, where PostgreSQL is installed: a missing server fails instead of skipping
REQUIRE_ENV = "DIFFTUNE_REQUIRE_POSTGRES"


def pg_bin() -> str | None:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own on 127.0.0.1 with a database ``mlflow`` owned by user
    ``mlflow`` (password authentication); stopped and deleted afterwards. PostgreSQL refuses
    to run as root: as root, it runs as the ``postgres`` user the Debian package made."""
    bindir = pg_bin()
    if bindir is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail("PostgreSQL's server programs are missing (Debian: apt-get install "
                        "postgresql)")
        pytest.skip("PostgreSQL's server programs are not installed (Debian: postgresql)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="dtpg", dir="/tmp"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(root, owner.pw_uid, owner.pw_gid)
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD)
    if as_user:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    port = free_port()
    data = root / "data"

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=300)

    run(f"{bindir}/initdb", "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}",
        "--auth=scram-sha-256", "--encoding=UTF8", "--no-instructions")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    run(f"{bindir}/pg_ctl", "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w",
        "start")
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="mlflow", password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow OWNER mlflow")
        yield {"port": port, "uri": f"postgresql://mlflow:{PASSWORD}@127.0.0.1:{port}/mlflow"}
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


SPACE = """
model: demo
search: {trials: 2, seed: 0, max_concurrent: 1, grace_period: 1}
fixed: {head: linear, epochs: 1, pool: 1, momentum: 0.9, batch_size: 128, t: 90}
params:
  block: {choice: [7, 10]}
  lr: {float: [0.01, 0.1], log: true}
"""


def test_a_database_uri_is_checked_before_anything_starts(postgres, tmp_path, capsys,
                                                          monkeypatch):
    """(The URI with its password comes from $MLFLOW_TRACKING_URI: on the command line it
    would be refused, see test_secrets.)"""
    wrong = postgres["uri"].replace(PASSWORD, "not-the-password")
    missing_driver = postgres["uri"].replace("postgresql://", "postgresql+pg8000://")
    for uri, says in ((wrong, 'password authentication failed for user "mlflow"'),
                      (missing_driver, "its database driver pg8000 is not installed; "
                                       "pip install 'pg8000'")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        rc = main(["search", "--storage", str(tmp_path / "runs"), "--experiment", "refused"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert says in err[0] and "not-the-password" not in err[0] and PASSWORD not in err[0]
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", wrong)
    rc = main(["search", "--resume", "refused"])
    assert rc == 2 and "password authentication failed" in capsys.readouterr().err


def test_a_search_straight_into_postgres_saves_no_password(postgres, ray_session, tmp_path,
                                                           capsys, monkeypatch):
    """The password is given in $MLFLOW_TRACKING_URI (no --tracking-uri): nothing saved (Ray
    Tune's experiment state, MLflow's records) or printed holds it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres["uri"])
    space = tmp_path / "s.yaml"
    space.write_text(SPACE)
    monkeypatch.chdir(tmp_path)
    rc = main(["search", "--space", str(space), "--experiment", "pg-direct",
               "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert PASSWORD not in out.out + out.err
    assert 'difftune export --experiment pg-direct --tracking-uri "$MLFLOW_TRACKING_URI"' \
        in out.out
    saved = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in saved)
    assert not [p for p in saved if PASSWORD.encode() in p.read_bytes()]
    client = MlflowClient(postgres["uri"])
    exp = client.get_experiment_by_name("pg-direct")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 3  # the search and its 2 trials
    assert not [r for r in runs if PASSWORD in str(r.data.tags) + str(r.data.params)]
    # the champion's artifacts are where every later command finds them (not ./mlruns)
    assert exp.artifact_location == (tmp_path / "mlartifacts" / "pg-direct").as_uri()
    assert client.get_model_version_by_alias("difftune-pg-direct", "champion")
    # the printed command, pasted with the variable set, finds the search: nothing to resume
    assert main(["search", "--resume", "pg-direct"]) == 0
    assert capsys.readouterr().out.startswith("nothing to resume")


def start_mlflow_server(postgres, root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` over the database, which it reads from MLFLOW_BACKEND_STORE_URI (as
    cluster/ starts it): the password is in no process's command line."""
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres["uri"],
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)


def test_search_export_and_train_against_postgres_behind_a_server(postgres, ray_session,
                                                                   tmp_path, capsys):
    port = free_port()
    server = start_mlflow_server(postgres, tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(True)]
        assert not [p for p in tree if PASSWORD in " ".join(p.cmdline())]
        space = tmp_path / "s.yaml"
        space.write_text(SPACE)
        rc = main(["search", "--space", str(space), "--experiment", "pg-server",
                   "--tracking-uri", uri, "--storage", str(tmp_path / "runs"),
                   "--cache", str(tmp_path / "cache")])
        out = capsys.readouterr().out
        assert rc == 0
        assert f"open the MLflow UI:  {uri}/" in out  # the server's own UI
        best = tmp_path / "best.yaml"
        assert main(["export", "--experiment", "pg-server", "--tracking-uri", uri,
                     "--out", str(best)]) == 0
        exported = yaml.safe_load(best.read_text())["configs"][0]
        capsys.readouterr()
        assert main(["train", str(best)]) == 0
        retrained = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
        assert retrained == pytest.approx(exported["val_top1"], abs=0.006)
        client = MlflowClient(uri)
        version = client.get_model_version_by_alias("difftune-pg-server", "champion")
        assert version.run_id == exported["run_id"]
    finally:
        os.killpg(server.pid, 9)
        server.wait()
