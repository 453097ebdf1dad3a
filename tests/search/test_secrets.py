"""No credential reaches MLflow or the terminal: URIs are recorded and printed redacted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import free_port
from mlflow.tracking import MlflowClient

from difftune.search.cli import main
from difftune.search.cli.search import follow_up
from difftune.search.records.tracking import TAG_RUNTIME, start_parent_run
from difftune.search.records.uris import redact, redact_text
from difftune.search.space.spec import load_space


def test_redact_masks_userinfo_and_secret_query_values():
    assert redact("http://alice:s3cr3t@mlflow.example:5000") == "http://***@mlflow.example:5000"
    got = redact("s3://bucket/cache?access_key=AKIA123&secret_key=abc&region=us-east-1"
                 "&session_token=zzz&endpoint_override=127.0.0.1:9000")
    assert "AKIA123" not in got and "abc" not in got and "zzz" not in got
    assert "region=us-east-1" in got and "endpoint_override=127.0.0.1" in got
    assert redact("/local/folder") == "/local/folder"
    assert redact_text("API request to http://bob:pw1@h:5000/api/2.0/x failed") == \
        "API request to http://***@h:5000/api/2.0/x failed"
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


def test_a_password_is_kept_in_memory_and_saved_nowhere(monkeypatch):
    """What is saved (the MLflow callback in Tune's tuner.pkl) holds the URI without its
    password; the driver puts it back at run time, from memory or $MLFLOW_TRACKING_URI."""
    import pickle

    from difftune.search.records import uris
    from difftune.search.run.trials import MLflowTrials

    monkeypatch.setattr(uris, "_SECRETS", {})
    monkeypatch.delenv(uris.TRACKING_URI_ENV, raising=False)
    full = "postgresql://mlflow:S3CRET@db.example:5432/mlflow"
    assert uris.public_uri(full) == "postgresql://mlflow@db.example:5432/mlflow"
    assert uris.resolve_uri(full) == full
    callback = MLflowTrials(full, "parent")
    assert b"S3CRET" not in pickle.dumps(callback)
    # (the callback connects with uris.runtime_uri(callback.tracking_uri))
    assert uris.runtime_uri(callback.tracking_uri) == full  # put back in this process
    restored = pickle.loads(pickle.dumps(callback))
    monkeypatch.setattr(uris, "_SECRETS", {})  # a new driver (--resume): from the environment
    monkeypatch.setenv(uris.TRACKING_URI_ENV, full)
    assert uris.runtime_uri(restored.tracking_uri) == full
    monkeypatch.delenv(uris.TRACKING_URI_ENV)  # else the URI as saved ($PGPASSWORD, ~/.pgpass)
    assert uris.runtime_uri(restored.tracking_uri) == "postgresql://mlflow@db.example:5432/mlflow"


@pytest.mark.parametrize("flag", ["--storage", "--cache"])
def test_credentials_in_a_saved_uri_are_refused(tmp_path, capsys, flag):
    uri = "s3://AKIAXXXX:VERYSECRET@bucket/path"
    rc = main(["search", flag, uri, "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
               "--experiment", "sec"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"difftune search: error: {flag} s3://***@bucket/path holds "
                             "credentials") and "AWS_ACCESS_KEY_ID" in err[0]
    assert not (tmp_path / "m.db").exists()


def test_printed_follow_up_commands_can_be_pasted():
    local = follow_up("sqlite:////runs/mlflow.db", "demo")
    assert "difftune ui --tracking-uri sqlite:////runs/mlflow.db" in local
    server = follow_up("http://mlflow.example:5000", "my exp")
    assert "open the MLflow UI:  http://mlflow.example:5000/" in server  # the server's own UI
    assert "difftune ui" not in server and "--experiment 'my exp'" in server
    secret = follow_up("postgresql://mlflow:S3CRET@db/mlflow", "demo")
    assert "S3CRET" not in secret and "***" not in secret
    assert secret.count('--tracking-uri "$MLFLOW_TRACKING_URI"') == 2
    assert "$MLFLOW_TRACKING_URI must hold" in secret


@pytest.mark.parametrize("argv, uri, allowed", [
    (["search"], "--tracking-uri postgresql://mlflow:S3CRET@db.example/mlflow",
     "allowed: postgresql://mlflow@db.example/mlflow with the password in $PGPASSWORD or "
     "~/.pgpass, or the whole URI in $MLFLOW_TRACKING_URI and --tracking-uri left out"),
    (["export", "--experiment", "x"], "--tracking-uri http://alice:S3CRET@mlflow.example:5000",
     "allowed: http://mlflow.example:5000 with the user and password in "
     "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD"),
    (["ui"], "--tracking-uri mysql+pymysql://root:S3CRET@db/mlflow", "$MLFLOW_TRACKING_URI"),
    (["search"], "--optuna-storage postgresql://optuna:S3CRET@db.example/optuna",
     "allowed: postgresql://optuna@db.example/optuna with the password in $PGPASSWORD or "
     "~/.pgpass"),
])
def test_a_password_on_the_command_line_is_refused(tmp_path, capsys, monkeypatch, argv, uri,
                                                   allowed):
    """`ps` shows a command line to every user of the machine, and Ray records the driver's
    as the job's entrypoint: a URI with a password given there is one line, exit 2, naming
    where the password belongs; nothing starts."""
    monkeypatch.chdir(tmp_path)
    flag, value = uri.split(" ")
    rc = main([*argv, flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"difftune {argv[0]}: error: argument {flag}: ")
    assert "holds a password" in err[0] and allowed in err[0] and "S3CRET" not in err[0]
    assert list(tmp_path.iterdir()) == []  # no store, no runs folder
    # a user name alone is no secret: the same URI without its password passes the parser
    bare = value.replace(":S3CRET", "")
    assert main([*argv, flag, bare, "--help"]) == 0


def test_ui_of_a_server_is_one_line_naming_its_own_ui(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@127.0.0.1:5999")
    rc = main(["ui"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pw" not in err[0].replace("open", "")
    assert "is an MLflow server" in err[0] and "open http://127.0.0.1:5999/" in err[0]


def test_ui_prints_the_store_redacted_and_keeps_it_off_the_command_line(tmp_path):
    """The store (here from $MLFLOW_TRACKING_URI) reaches `mlflow ui` through its
    environment, not its command line (which every user of the machine can read in ps)."""
    secret = "postgresql://mlflow:S3CRET@127.0.0.1:9/mlflow"  # nothing listens: it stays up
    proc = subprocess.Popen([sys.executable, "-m", "difftune", "ui",
                             "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": secret})
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert "postgresql://***@127.0.0.1:9/mlflow" in first and "S3CRET" not in first
        # a store that refuses connections gets no links (MLflow would retry for minutes)
        assert "no links to the searches" in second and "cannot connect" in second
        assert "postgresql://***@127.0.0.1:9/mlflow" in second and "S3CRET" not in second
        deadline = time.monotonic() + 120
        def after_exec() -> str:  # /proc/PID/cmdline reads empty while execve swaps images
            line = " ".join(psutil.Process(proc.pid).cmdline())
            return line if line and " -m difftune " not in f"{line} " else ""

        while not after_exec():
            assert proc.poll() is None, f"difftune ui exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "difftune ui never became mlflow ui"
            time.sleep(0.1)  # until the exec
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        cmdlines = [" ".join(p.cmdline()) for p in tree]
        assert " ui " in cmdlines[0] + " " and "--host 127.0.0.1" in cmdlines[0]
        assert not [c for c in cmdlines if "S3CRET" in c], cmdlines
        assert psutil.Process(proc.pid).environ()["MLFLOW_BACKEND_STORE_URI"] == secret
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def login_server():
    """An HTTP server that, like `mlflow server --app-name basic-auth`, answers 401 to a
    request without the right basic-auth login (MLflow's auth app needs Flask-WTF, which
    the test environment does not install)."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    right = "Basic " + base64.b64encode(b"difftune:right-password").decode()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's hook
            seen.append(self.path)
            ok = self.headers.get("Authorization") == right
            body = b'{"experiments": []}' if ok else b"You are not authenticated."
            self.send_response(200 if ok else 401)
            if not ok:
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_a_server_that_asks_for_a_login_is_checked_before_anything_starts(
        login_server, tmp_path, capsys, monkeypatch):
    from difftune.search.records.uris import check_reachable

    url, seen = login_server
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    cases = [
        ({}, f"--tracking-uri {url} asks for a user and password (HTTP 401); allowed: "
             "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD in the environment"),
        ({"MLFLOW_TRACKING_USERNAME": "difftune", "MLFLOW_TRACKING_PASSWORD": "wrong"},
         f"--tracking-uri {url} refused the password of user 'difftune' (HTTP 401)"),
    ]
    for env, says in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for argv in (["export", "--experiment", "x", "--out", str(tmp_path / "b.yaml")],
                     ["search", "--storage", str(tmp_path / "runs")]):
            rc = main([*argv, "--tracking-uri", url])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1, err
            assert says in err[0] and "wrong" not in err[0], err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert seen and all(p.startswith("/api/2.0/mlflow/experiments/search") for p in seen)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-password")
    check_reachable(url)  # the login MLflow's client will send is accepted
