"""URIs of stores (tracking, Tune storage, feature cache): the default tracking store, the
one redaction of credentials for anything printed or recorded, where a tracking password
lives at run time (never in anything saved), and the checks that a store is there before a
command starts."""

from __future__ import annotations

import os
import re
import shlex
import socket
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

from difftune.trainables.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: MLflow's own variable for the tracking URI: the default of ``--tracking-uri``, and where a
#: URI with a password is best kept (printed commands name it instead of the password)
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: SQLAlchemy dialects MLflow stores runs in directly (no server)
DATABASE_SCHEMES = ("postgresql", "postgres", "mysql", "mssql", "oracle")
#: the package to install for a missing database driver module
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary",
                   "MySQLdb": "mysqlclient", "pymysql": "pymysql", "pg8000": "pg8000",
                   "pyodbc": "pyodbc", "oracledb": "oracledb", "asyncpg": "asyncpg"}


class TrackingError(UserError):
    """The tracking server cannot be reached, or holds nothing to export."""


_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "signature")
#: the URIs with a password this process was given, by their :func:`public_uri` (memory only)
_SECRETS: dict[str, str] = {}


def _secret_keys(pairs: list[tuple[str, str]]) -> list[str]:
    return [k for k, _ in pairs if any(w in k.lower() for w in _SECRET_WORDS)]


def redact(uri: str | None) -> str | None:
    """``uri`` with credentials masked (``user:pass@`` and query values such as
    ``secret_key=``): the one form of a URI that is printed, logged or recorded."""
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = _secret_keys(pairs)
    if "@" not in parts.netloc and not secret:
        return uri  # nothing to hide: keep it exactly as given
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if k in secret else v) for k, v in pairs], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` (an error message, say) with every URI in it passed through :func:`redact`."""
    return re.sub(r"[A-Za-z][\w+.-]*://[^\s'\"<>]+", lambda m: redact(m[0]), text)


def has_secret(uri: str | None) -> bool:
    """Whether ``uri`` carries credentials (what :func:`redact` would mask)."""
    return redact(uri) != uri


def has_password(uri: str | None) -> bool:
    """Whether ``uri`` holds a password (``user:password@``) or a secret query value: what
    must not be on a command line. A user name alone is no secret."""
    if not uri or "://" not in uri:
        return False
    parts = urlsplit(uri)
    try:
        password = parts.password
    except ValueError:  # an unparsable netloc: judge by its user info
        password = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else None
    return bool(password) or bool(_secret_keys(parse_qsl(parts.query, keep_blank_values=True)))


def refuse_password_on_command_line(flag: str, uri: str) -> None:
    """A password in a URI given on the command line (``--tracking-uri``,
    ``--optuna-storage``) is refused: ``ps`` shows a command line to every user of the
    machine and Ray records the driver's as its job's entrypoint. Raises ``ValueError``
    naming where the password belongs instead."""
    if not has_password(uri):
        return
    if scheme(uri) in ("http", "https"):
        parts = urlsplit(uri)
        bare = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path,
                           parts.query, parts.fragment))
        where = (f"{bare} with the user and password in $MLFLOW_TRACKING_USERNAME and "
                 "$MLFLOW_TRACKING_PASSWORD")
    else:
        where = f"{public_uri(uri)} with the password in $PGPASSWORD or ~/.pgpass"
    if flag == "--tracking-uri":
        where += f", or the whole URI in ${TRACKING_URI_ENV} and --tracking-uri left out"
    raise ValueError(f"{redact(uri)} holds a password, which every user of this machine can "
                     "read on a command line (ps) and Ray records as the job's entrypoint; "
                     f"allowed: {where}")


def public_uri(uri: str) -> str:
    """``uri`` without its secrets (the password of ``user:password@``, secret query values):
    what may be saved. The user name stays, so libpq's ``$PGPASSWORD`` / ``~/.pgpass`` (or
    the registered URI, :func:`runtime_uri`) can supply the password again."""
    if not has_secret(uri):
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}@{host}" if user.split(":", 1)[0] else host
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = _secret_keys(pairs)
    query = urlencode([(k, v) for k, v in pairs if k not in secret], safe=":/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def remember(uri: str) -> str:
    """Keep ``uri``'s secrets in this process's memory (for :func:`runtime_uri`) and return
    its :func:`public_uri`."""
    public = public_uri(uri)
    if public != uri:
        _SECRETS[public] = uri
    return public


def runtime_uri(uri: str) -> str:
    """The URI to connect with: ``uri`` with the secrets this process was given
    (:func:`remember`), or those of ``$MLFLOW_TRACKING_URI`` when it names the same store;
    else ``uri`` as it is (a database driver may find the password itself)."""
    public = public_uri(uri)
    if public in _SECRETS:
        return _SECRETS[public]
    env = os.environ.get(TRACKING_URI_ENV)
    if env and public_uri(env) == public:
        return env
    return uri


def paste_form(uri: str) -> str:
    """``uri`` as a printed command should spell it: quoted for a shell, or, when it holds a
    password, ``"$MLFLOW_TRACKING_URI"`` (the password is never printed)."""
    return f'"${TRACKING_URI_ENV}"' if has_secret(uri) else shlex.quote(uri)


def refuse_secrets(setting: str, uri: str | None) -> None:
    """Refuse credentials in a URI that is saved (Tune's experiment state, the parent run):
    they belong in the environment."""
    if uri and has_secret(uri):
        raise UserError(f"{setting} {redact(uri)} holds credentials, which would be saved with "
                        "the search; allowed: the URI without them, and the credentials in the "
                        "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        "~/.aws/credentials, GOOGLE_APPLICATION_CREDENTIALS or the node's "
                        "role)")


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory (as an absolute path, so Ray workers and
    later commands agree). A password in it is remembered for this process only, and one
    kept in ``$MLFLOW_TRACKING_URI`` is put back (:func:`runtime_uri`)."""
    uri = uri or os.environ.get(TRACKING_URI_ENV)
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    remember(uri)
    return runtime_uri(uri)


def scheme(uri: str) -> str:
    """The scheme of a URI, without a SQLAlchemy driver (``postgresql+psycopg`` ->
    ``postgresql``)."""
    return urlparse(uri).scheme.split("+", 1)[0].lower()


def is_database(uri: str) -> bool:
    return scheme(uri) in DATABASE_SCHEMES


def server_ui(uri: str) -> str | None:
    """The web UI of an MLflow tracking server URI (its own address, no credentials), or
    None for a store that is not a server."""
    if scheme(uri) not in ("http", "https"):
        return None
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path or "/", "",
                       ""))


def check_reachable(uri: str, *, timeout: float = 5.0, must_exist: bool = False) -> None:
    """Fail with one clear line if a remote tracking server does not answer, a database
    cannot be used (driver, connection, authentication), or, with ``must_exist``, a sqlite
    store is not there (reading must not create one)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise TrackingError(f"--tracking-uri {redact(uri)} is unreachable "
                                f"({exc.strerror or exc}); start the server or pass a "
                                "reachable URI") from None
        check_login(uri, timeout=timeout)
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingError(f"--tracking-uri {redact(uri)}: folder {db.parent} does not "
                                "exist")
        if must_exist and not db.is_file():
            raise TrackingError(f"--tracking-uri {redact(uri)}: there is no MLflow store at "
                                f"{db} (run a search first or pass the store's URI)")
    elif is_database(uri):
        check_database(uri, timeout=timeout)


#: where MLflow's clients read the login of a tracking server that asks for one
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def check_login(uri: str, *, timeout: float = 5.0) -> None:
    """One clear line when an MLflow server that asks for a login (``mlflow server
    --app-name basic-auth``) refuses the one MLflow's clients will send (``$MLFLOW_TRACKING_
    USERNAME`` / ``$MLFLOW_TRACKING_PASSWORD``, else ``$MLFLOW_TRACKING_TOKEN``), or lets it
    read no experiment: one request, before anything starts. Other answers are left to
    MLflow."""
    import base64
    import urllib.error
    import urllib.request

    parts = urlsplit(uri)
    base = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path.rstrip("/"),
                       "", ""))
    user, password = (os.environ.get(k) for k in LOGIN_ENV)
    if parts.username and not (user or password):  # MLflow sends a URI's own user info
        user, password = parts.username, parts.password
    headers = {}
    if user or password:
        pair = f"{user or ''}:{password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (urllib.error.URLError, OSError, ValueError):  # MLflow's own errors say more
        return
    shown = f"--tracking-uri {redact(uri)}"
    login = "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD in the environment"
    if code == 401 and not (user or password):
        raise TrackingError(f"{shown} asks for a user and password (HTTP 401); allowed: "
                            f"{login} (never on the command line)")
    if code == 401:
        raise TrackingError(f"{shown} refused the password of user {user!r} (HTTP 401); "
                            f"allowed: the user's password in {login}")
    if code == 403:
        raise TrackingError(f"{shown}: user {user!r} may not read experiments (HTTP 403); "
                            "allowed: a user the server's admin gave READ or EDIT")


def check_database(uri: str, *, timeout: float = 5.0) -> None:
    """Connect once to a database tracking store: its driver is importable, the server
    answers and accepts the credentials (the URI's, ``$PGPASSWORD``, ``~/.pgpass``)."""
    import sqlalchemy as sa

    shown = f"--tracking-uri {redact(uri)}"
    try:
        url = sa.engine.make_url(runtime_uri(uri))
        args = {"connect_timeout": int(max(1, timeout))} \
            if url.get_backend_name() in ("postgresql", "mysql") else {}
        engine = sa.create_engine(url, connect_args=args, poolclass=sa.pool.NullPool)
    except ModuleNotFoundError as exc:
        package = DRIVER_PACKAGES.get(exc.name or "", exc.name)
        raise TrackingError(f"{shown}: its database driver {exc.name} is not installed; "
                            f"pip install '{package}'") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as exc:
        raise TrackingError(f"{shown} is not a database URI SQLAlchemy reads: "
                            f"{str(exc).splitlines()[0]}") from None
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        why = (str(exc.orig).strip().splitlines() or ["no answer"])[-1].strip()
        if "password" in why.lower() or "authentication" in why.lower():
            why += (f" (the password comes from the URI, ${TRACKING_URI_ENV}, $PGPASSWORD or "
                    "~/.pgpass)")
        raise TrackingError(f"{shown}: cannot connect: {why}") from None
    finally:
        engine.dispose()


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store (``mlartifacts/``), under
    the working directory for a database store (MLflow's own default, ``./mlruns``, would be
    relative to whichever directory a later command runs in); a server decides for itself
    (None)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment
        return folder.as_uri()
    if is_database(uri):
        return (Path.cwd() / "mlartifacts" / experiment).resolve().as_uri()
    return None


def storage_join(storage: str, name: str) -> str:
    """``storage/name`` for Ray Tune's storage (a folder or a URI): a URI's query
    (``s3://bucket/runs?endpoint_override=...``) stays at the end, where pyarrow reads it."""
    if "://" not in storage:
        return f"{storage.rstrip('/')}/{name}"
    base, sep, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def check_storage(storage: str | None) -> None:
    """Fail with one line, before anything is written, when Ray Tune's storage URI cannot be
    opened: pyarrow refuses its query (an unknown option) or its bucket does not exist."""
    if not storage or "://" not in storage or storage.startswith("file://"):
        return
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(storage)
        bucket = path.split("/", 1)[0]
        missing = bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        text = str(exc).strip()
        raise UserError(f"--storage {redact(storage)} cannot be opened: "
                        f"{text.splitlines()[0] if text else type(exc).__name__}") from None
    if missing:
        raise UserError(f"--storage {redact(storage)}: bucket {bucket!r} does not exist; "
                        "create it, or pass a storage URI in an existing bucket")
