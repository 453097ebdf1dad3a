"""What a search needs from a Ray cluster: joining it, checks and per-trial resources. Ray
is imported inside the functions that use it: :func:`local_ray_on_loopback` must run first.

- :func:`check_addressable`: on a cluster with more than one node, every place a trial
  or a later command reads or writes (Ray Tune's storage path, the feature cache, the MLflow
  tracking store) must be reachable from every node. A local path of the driver is rejected
  with one line naming the setting and what is allowed, unless it lies on a shared filesystem:
  a network mount (NFS/EFS/Filestore, CIFS, Lustre, gcsfuse, ... read from ``/proc/mounts``)
  or a folder declared shared in ``$DIFFTUNE_SHARED_PATHS`` (absolute path prefixes separated
  by ``:``, e.g. ``/mnt/shared:/data``: a mount this machine cannot recognise, or one machine
  pretending to be several nodes).
- :func:`check_inputs_on_nodes`: read-only inputs (a checkpoint, an ImageFolder root) need not
  be shared, only present at the same path on every node; one probe task per alive node checks
  (nodes an autoscaler adds later cannot be probed before they exist).
- Both count a cluster as multi-node when more than one node is alive *or* its autoscaler may
  add nodes (:func:`max_nodes`), as the GPU count does (:func:`cluster_gpus`): an autoscaling
  cluster starts with its head alone.
- :func:`trial_resources`: CPUs and GPUs per trial. A space that sets ``gpus_per_trial`` gets
  exactly that for every trial; otherwise each trial gets the fraction its head kind declares
  (:attr:`~difftune.trainables.heads.HeadKind.gpus`) when the cluster has (or can autoscale
  to) GPUs, else none.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from difftune.search.records.uris import is_database, redact
from difftune.trainables.errors import UserError
from difftune.trainables.heads import KINDS
from difftune.trainables.params import decode

logger = logging.getLogger(__name__)

#: absolute path prefixes (``os.pathsep``-separated) the user declares mounted on every node
SHARED_PATHS_ENV = "DIFFTUNE_SHARED_PATHS"
#: filesystem types of /proc/mounts that are shared between machines
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "cephfs", "ocfs2", "gfs2", "afs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3",
    "fuse.juicefs", "fuse.glusterfs", "fuse.cephfs", "fuse.ceph-fuse", "fuse.sshfs",
    "fuse.rclone", "fuse.goofys", "fuse.blobfuse", "fuse.blobfuse2", "fuse.weka",
})
#: tracking URI schemes that name a store on the driver's disk
LOCAL_TRACKING_SCHEMES = ("sqlite", "file", "")
#: where the cluster's mount table is read (a module attribute so tests can point elsewhere)
MOUNTS = "/proc/mounts"

#: Ray's own switch for single-machine use (its default on Windows and macOS): "0" makes a
#: local Ray use 127.0.0.1 as its node address, so its processes listen on loopback only
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterError(UserError):
    """A setting names something that not every node of the Ray cluster can reach."""


def ensure_ray(address: str | None) -> None:
    """Join ``address`` (or start a local Ray) unless this process already has a session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a tracking server that went away must not stall the driver for minutes per request:
    # MLflowTrials keeps the records and sends them when it is back
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import ray  # see the module's doc

    if not ray.is_initialized():
        where: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
        ray.init(logging_level=logging.WARNING, log_to_driver=False, **where)


def local_ray_on_loopback() -> bool:
    """Make the local Ray this process is about to start listen on 127.0.0.1 only (Ray's
    GCS, raylet, workers and agents; the dashboard is off): Ray reads :data:`LOOPBACK_ENV`
    when it is imported, so this must run first. Whether it took effect (False when Ray was
    imported already, or the variable is set by the user)."""
    if "ray" in sys.modules or LOOPBACK_ENV in os.environ:
        return False
    os.environ[LOOPBACK_ENV] = "0"
    return True


# ------------------------------------------------------------------------- shared paths


def shared_prefixes(env: Mapping[str, str] | None = None) -> list[str]:
    """The folders declared shared in ``$DIFFTUNE_SHARED_PATHS`` (normalised, absolute)."""
    raw = (os.environ if env is None else env).get(SHARED_PATHS_ENV, "")
    out = []
    for part in raw.split(os.pathsep):
        part = part.strip()
        if part:
            if not os.path.isabs(part):
                raise ClusterError(f"${SHARED_PATHS_ENV} entry {part!r} is not an absolute "
                                   "path; allowed: absolute folders separated by "
                                   f"{os.pathsep!r}, e.g. /mnt/shared{os.pathsep}/data")
            out.append(os.path.normpath(part))
    return out


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: str, mounts: str | None = None) -> tuple[str, str] | None:
    """``(mount point, filesystem type)`` of the mount holding ``path``, or None when the
    mount table cannot be read (not Linux)."""
    try:
        with open(mounts or MOUNTS) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape(fields[1]), fields[2]
        if _under(real, point) and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)  # the last of equal mount points is the visible one
    return best


def is_shared_path(path: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``path`` is on a filesystem every node mounts: declared in
    ``$DIFFTUNE_SHARED_PATHS``, or on a network filesystem (:data:`NETWORK_FS`)."""
    candidates = {os.path.normpath(os.path.abspath(path)), os.path.realpath(path)}
    for prefix in shared_prefixes(env):
        real_prefix = os.path.realpath(prefix)
        if any(_under(c, prefix) or _under(c, real_prefix) for c in candidates):
            return True
    found = mount_of(path)
    return found is not None and found[1] in NETWORK_FS


# ------------------------------------------------------------------------- URIs and paths


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    if sep:
        return head.lower()
    head, sep, _ = uri.partition(":")
    # "sqlite:relative.db" style, but not a Windows drive letter
    return head.lower() if sep and len(head) > 1 and "/" not in head else ""


def local_path_of_store(value: str) -> str | None:
    """The local path a storage/cache setting names (``file://`` or a plain path), or None
    for a URI of a remote filesystem (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ...)."""
    scheme = _scheme(value)
    if scheme == "file":
        return value.split("://", 1)[1].split("?", 1)[0] or "/"
    if scheme in ("", "local"):
        return value.split("://", 1)[-1]
    return None


def local_path_of_tracking(uri: str) -> str | None:
    """The local file or folder an MLflow tracking URI stores runs in (``sqlite:``,
    ``file:``, a plain path), or None for a server or database reachable over the network
    (``http(s)://``, ``databricks``, ``postgresql://``, ``mysql://``, ...)."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        rest = uri.split(":", 1)[1]
        rest = rest[3:] if rest.startswith("///") else rest.lstrip("/")  # sqlite:////abs.db
        return rest.split("?", 1)[0] or ":memory:"
    if scheme == "file":
        return urlparse(uri).path or "."
    if scheme == "" and uri != "databricks":
        return uri
    return None


def alive_nodes(nodes: Sequence[Mapping[str, Any]] | None = None) -> list[Mapping[str, Any]]:
    """The alive nodes of the connected Ray cluster (``ray.nodes()``), or of ``nodes``."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive")]


def max_nodes(config: Any = None) -> int:
    """The most nodes the connected cluster's autoscaler may run (Ray publishes the node
    types of a launcher/KubeRay cluster: the sum of their ``max_count``, ``sys.maxsize`` when
    one is unbounded), or 0 when no autoscaler config is published (a cluster of fixed
    nodes, a local Ray).

    :param config: an ``autoscaler_pb2.ClusterConfig`` (read from the cluster when None).
    """
    if config is None:
        try:
            from ray._private.state import state

            config = state.get_cluster_config()
        except Exception as exc:  # a private API: never let it break a search
            logger.debug("no autoscaler config: %s", exc)
            return 0
    if config is None:
        return 0
    total = 0
    for group in config.node_group_configs:
        if group.max_count < 0:
            return sys.maxsize
        total += group.max_count
    return total


def _nodes_phrase(alive: int, most: int) -> str:
    if most > alive:
        up_to = "any number of" if most == sys.maxsize else f"up to {most}"
        return f"{alive} node{'s' * (alive != 1)} now and its autoscaler may add nodes " \
               f"({up_to})"
    return f"{alive} nodes"


def check_addressable(
    *,
    storage_path: str | None,
    cache: str | None,
    tracking_uri: str,
    artifact_location: str | None = None,
    nodes: Sequence[Mapping[str, Any]] | None = None,
    most_nodes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Reject, on a cluster of more than one node, a local path that is not shared.

    Call it once Ray is up (``ray.nodes()`` answers). The cluster counts as more than one node
    when more than one is alive or its autoscaler may start more (:func:`max_nodes`: an
    autoscaling cluster starts with its head alone). One node that stays one (a laptop, a
    local Ray): anything goes.

    :param storage_path: Ray Tune's storage path (None: ``./difftune_runs``).
    :param cache: the feature cache folder or URI (None: no cache, nothing to check).
    :param tracking_uri: the MLflow tracking URI the driver records to.
    :param artifact_location: where the experiment's artifacts (the champion) go, for a
        database tracking URI (a server decides for itself; sqlite: beside its file).
    :param nodes: ``ray.nodes()`` (queried when None).
    :param most_nodes: :func:`max_nodes` (queried when None).
    :param env: the environment holding ``$DIFFTUNE_SHARED_PATHS`` (``os.environ`` when None).
    :raises ClusterError: one line naming every offending setting and what is allowed
        (one sentence per setting).
    """
    alive = len(alive_nodes(nodes))
    most = max_nodes() if most_nodes is None else most_nodes
    if max(alive, most) <= 1:
        return
    n = _nodes_phrase(alive, most)
    shared_hint = (f"a folder on a filesystem mounted on every node (NFS/EFS/Filestore, or "
                   f"declared in ${SHARED_PATHS_ENV})")
    problems = []
    storage = storage_path or "./difftune_runs"
    local = local_path_of_store(storage)
    if local is not None and not is_shared_path(local, env):
        shown = redact(storage) if storage_path else f"{storage} (the default)"
        problems.append(f"--storage {shown} is a local folder of the driver but the Ray "
                        f"cluster has {n}; allowed: {shared_hint}, or s3://BUCKET/PATH, "
                        "gs://BUCKET/PATH")
    if cache:
        local = local_path_of_store(cache)
        if local is not None and not is_shared_path(local, env):
            problems.append(f"--cache {redact(cache)} is a local folder of the driver but the "
                            f"Ray cluster has {n}; allowed: {shared_hint}, "
                            "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (pyarrow URIs), or "
                            "--no-cache")
    local = local_path_of_tracking(tracking_uri)
    if local is not None and (local == ":memory:" or not is_shared_path(local, env)):
        problems.append(f"--tracking-uri {redact(tracking_uri)} is a store on the driver's disk "
                        f"but the Ray cluster has {n}; allowed: an MLflow server "
                        "http://HOST:PORT reachable from every node, a database URI "
                        "(postgresql://...), or sqlite:////PATH in " + shared_hint)
    if is_database(tracking_uri):
        where = local_path_of_store(artifact_location) if artifact_location else "./mlruns"
        if where is not None and not is_shared_path(where, env):
            problems.append(f"--tracking-uri {redact(tracking_uri)} keeps no artifacts itself "
                            f"and they would go to {redact(artifact_location) or './mlruns'}, "
                            f"a local folder of the driver, but the Ray cluster has {n}; "
                            "allowed: --artifact-location s3://BUCKET/PATH, gs://BUCKET/PATH or "
                            f"{shared_hint} (for a new experiment), or an MLflow server "
                            "http://HOST:PORT that stores them")
    if problems:
        raise ClusterError(". ".join(problems))
    logger.debug("storage %s, cache %s and tracking %s are reachable from all nodes (%s)",
                 redact(storage), redact(cache), redact(tracking_uri), n)


def check_inputs_on_nodes(
    inputs: Mapping[str, str | None],
    *,
    timeout_s: float = 120.0,
) -> None:
    """Check that every local path of ``inputs`` (setting -> path; None, preset names and
    URIs are skipped) exists on every alive node of the connected cluster: one zero-CPU probe
    task pinned to each node. Read-only inputs need not be on a shared filesystem, only at the
    same path everywhere (a shared mount, or copied by the cluster's setup commands).

    :raises ClusterError: naming the setting, the path and the nodes that lack it.
    """
    paths = {k: v for k, v in inputs.items() if v and "://" not in v and os.path.isabs(v)}
    alive = alive_nodes()
    if not paths or max(len(alive), max_nodes()) <= 1:
        return  # one node that stays one: the driver checked its inputs itself
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def _probe(wanted: list[str]) -> list[str]:
        return [p for p in wanted if not os.path.exists(p)]

    wanted = sorted(set(paths.values()))
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(wanted) for n in alive}
    missing: dict[str, list[str]] = {}
    for node, ref in refs.items():
        try:
            for p in ray.get(ref, timeout=timeout_s):
                missing.setdefault(p, []).append(node)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
            logger.warning("could not check the inputs on node %s: %s", node, exc)
    problems = [f"{setting} {path} is missing on {len(missing[path])} of {len(alive)} nodes "
                f"({', '.join(sorted(missing[path]))}); allowed: a path present on every node "
                "(a shared mount, or copied there by the cluster's setup commands)"
                for setting, path in paths.items() if path in missing]
    if problems:
        raise ClusterError(". ".join(problems))


# ------------------------------------------------------------------------- GPUs per trial


def default_gpus(head: str) -> float:
    """The GPU fraction a trial of head type ``head`` asks for by default."""
    kind = KINDS.get(head)
    return kind.gpus if kind is not None else 1.0  # unknown: a whole GPU, never too little


def cluster_gpus() -> float:
    """GPUs of the connected cluster: those of its nodes now, or the most its autoscaler
    can add (Ray publishes the node types of a launcher/KubeRay cluster), whichever is more."""
    import ray

    now = float(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        most = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception as exc:  # a private API: never let it break a search
        logger.debug("no autoscaler config: %s", exc)
        most = 0.0
    return max(now, most)


def trial_resources(
    search: Mapping[str, Any],
    *,
    gpus_available: float,
) -> dict[str, float] | Callable[[dict[str, Any]], dict[str, float]]:
    """The ``resources`` argument of ``tune.with_resources`` for a space's search settings.

    ``gpus_per_trial`` set (a number): that, for every trial. None (the space does not set
    it): :func:`default_gpus` of each trial's head when ``gpus_available`` > 0, else 0. The
    per-head form is a function of the trial config, which ``tune.with_resources`` accepts.
    """
    cpus = float(search["cpus_per_trial"])
    gpus = search.get("gpus_per_trial")
    if gpus is not None:
        return {"cpu": cpus, "gpu": float(gpus)}
    if gpus_available <= 0:
        return {"cpu": cpus, "gpu": 0.0}
    return _PerHead(cpus, min(1.0, float(gpus_available)))


class _PerHead:
    """Resources of one trial from its head type (a class, so Ray pickles it plainly)."""

    def __init__(self, cpus: float, most: float):
        self.cpus, self.most = cpus, most

    def __call__(self, config: dict[str, Any]) -> dict[str, float]:
        head = decode(config).get("head") or "linear"
        return {"cpu": self.cpus, "gpu": min(default_gpus(str(head)), self.most)}

    def __repr__(self) -> str:
        return f"per-head GPUs {({k: v.gpus for k, v in KINDS.items()})} (cpu {self.cpus})"
