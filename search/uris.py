"""Tracking URIs: the default store, redaction of credentials in anything printed or
recorded, and the checks that a store is there before a command starts."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from difftune.trainables.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(UserError):
    """The tracking server cannot be reached, or holds nothing to export."""


_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "signature")


def redact(uri: str | None) -> str | None:
    """``uri`` with credentials masked (``user:pass@`` and query values such as
    ``secret_key=``), for anything printed or recorded. Credentials belong in the
    environment (AWS_*, MLFLOW_TRACKING_TOKEN, ...), where nothing here reads them out."""
    if not uri or "://" not in uri:
        return uri
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret = [k for k, _ in pairs if any(w in k.lower() for w in _SECRET_WORDS)]
    if "@" not in parts.netloc and not secret:
        return uri  # nothing to hide: keep it exactly as given
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = urlencode([(k, "***" if k in secret else v) for k, v in pairs], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: ``--tracking-uri``, else ``sqlite:///mlflow.db`` in the working
    directory (as an absolute path, so Ray workers and later commands agree)."""
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    return uri


def check_reachable(uri: str, *, timeout: float = 5.0, must_exist: bool = False) -> None:
    """Fail with one clear line if a remote tracking server does not answer (or, with
    ``must_exist``, if a sqlite store is not there: reading must not create one)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            raise TrackingError(f"--tracking-uri {redact(uri)} is unreachable ({exc.strerror or exc}); "
                                "start the server or pass a reachable URI") from None
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrackingError(f"--tracking-uri {uri}: folder {db.parent} does not exist")
        if must_exist and not db.is_file():
            raise TrackingError(f"--tracking-uri {uri}: there is no MLflow store at {db} "
                                "(run a search first or pass the store's URI)")


def artifact_root(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store go beside the database file (``mlartifacts/``), not into
    whatever the working directory is; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment
        return folder.as_uri()
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
