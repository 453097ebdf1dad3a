"""The files of cluster/ are what Ray's and Kubernetes' schemas accept, offline:

- the cluster launcher YAMLs against the JSON schema shipped in the ray package
  (``ray/autoscaler/ray-schema.json``), as given and with the provider's defaults filled in
  by Ray's ``ray.autoscaler.sdk.fillout_defaults``;
- the Kubernetes objects (PersistentVolumeClaim, ServiceAccount, Deployment, Service) against
  the Kubernetes OpenAPI schemas shipped in the ``kubernetes-validate`` package (strict: an
  unknown field fails), and KubeRay's RayCluster/RayJob against the fields of KubeRay's
  ``ray.io/v1`` types (unknown fields fail) with every pod template checked against
  Kubernetes' own ``PodTemplateSpec`` schema;
- and the settings difftune relies on: a CPU head that runs no trial, GPU workers, token
  authentication, one shared folder declared in ``$DIFFTUNE_SHARED_PATHS`` and mounted on
  every node, difftune installed, entrypoints that difftune's CLI parses, an MLflow server
  that asks for a password (MLflow's basic-auth app) and no password on any command line or
  inline in any file.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
K8S_VERSION = "1.33"
SHARED = {"aws": "/mnt/efs", "gcp": "/mnt/shared", "kuberay": "/mnt/shared"}


# ------------------------------------------------------------------ Ray cluster launcher


def ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture(params=sorted(LAUNCHERS), scope="module")
def launcher(request) -> tuple[str, dict]:
    return request.param, yaml.safe_load(LAUNCHERS[request.param].read_text())


def test_launcher_files_pass_rays_schema_and_config_checks(launcher):
    from ray.autoscaler.sdk import fillout_defaults

    name, cfg = launcher
    jsonschema.validate(cfg, ray_schema())
    # what `ray up` checks after filling in the provider's defaults (offline)
    filled = fillout_defaults(copy.deepcopy(cfg))
    jsonschema.validate(filled, ray_schema())
    types = filled["available_node_types"]
    assert filled["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= filled["max_workers"]
    assert cfg["provider"]["type"] == name


def test_rays_schema_is_strict_enough_to_catch_a_typo(launcher):
    _, cfg = launcher
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 1  # min_workers misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def test_launcher_head_runs_no_trials_and_gpu_workers_autoscale(launcher):
    _, cfg = launcher
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu.get("min_workers", 0) == 0
    assert gpu["max_workers"] <= cfg["max_workers"]


def test_launcher_nodes_share_a_folder_install_difftune_and_use_token_auth(launcher):
    name, cfg = launcher
    shared = SHARED[name]
    assert f"--volume {shared}:{shared}" in cfg["docker"]["run_options"]
    assert any(shared in c and "mount" in c for c in cfg["initialization_commands"])
    assert cfg["file_mounts"]["~/difftune"] == "."
    assert "pip install -q -e ~/difftune" in cfg["setup_commands"]
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert "RAY_AUTH_MODE=token" in start and f"DIFFTUNE_SHARED_PATHS={shared}" in start
    head = " ".join(cfg["head_start_ray_commands"])
    # the server's settings come from the env file, exported; none is on its command line
    assert "mlflow server" in head and "set -a; . ~/.difftune/mlflow.env; set +a;" in head
    server = head[head.index("mlflow server"):]
    assert "--backend-store-uri" not in server and "MLFLOW_BACKEND_STORE_URI" not in server
    assert "--artifacts-destination" not in server


def test_the_mlflow_servers_have_sqlalchemys_postgresql_driver(launcher):
    """SQLAlchemy 2.1 reads postgresql:// with psycopg 3 (psycopg2 is not enough); the
    basic-auth app needs mlflow's auth extra (Flask-WTF)."""
    name, cfg = launcher
    setup = " ".join(cfg["head_setup_commands"])
    assert '"psycopg[binary]>=3.1"' in setup and "psycopg2" not in setup
    assert '"mlflow[auth]>=3.0"' in setup
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert '"psycopg[binary]>=3.1"' in dockerfile and "psycopg2" not in dockerfile
    assert '"mlflow[auth]"' in dockerfile


# ------------------------------------------------------------------------------- KubeRay

_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer"}


def _strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


#: ray.io/v1 RayCluster and RayJob as KubeRay's Go types define them
#: (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go); pod templates are
#: validated separately against Kubernetes' PodTemplateSpec
_HEAD = _strict({"serviceType": {"type": "string"}, "headService": _ANY_OBJECT,
                 "enableIngress": {"type": "boolean"}, "rayStartParams": _STR_MAP,
                 "template": _ANY_OBJECT}, ("rayStartParams", "template"))
_WORKER = _strict({"groupName": {"type": "string"}, "replicas": _INT, "minReplicas": _INT,
                   "maxReplicas": _INT, "numOfHosts": _INT, "idleTimeoutSeconds": _INT,
                   "suspend": {"type": "boolean"}, "rayStartParams": _STR_MAP,
                   "template": _ANY_OBJECT, "scaleStrategy": _ANY_OBJECT},
                  ("groupName", "rayStartParams", "template"))
RAY_CLUSTER_SPEC = _strict({
    "headGroupSpec": _HEAD,
    "workerGroupSpecs": {"type": "array", "items": _WORKER},
    "rayVersion": {"type": "string"},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": _strict({
        "resources": _ANY_OBJECT, "image": {"type": "string"},
        "imagePullPolicy": {"type": "string"}, "env": {"type": "array"},
        "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
        "securityContext": _ANY_OBJECT, "idleTimeoutSeconds": _INT, "version": {"type": "string"},
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}),
    "authOptions": _strict({"mode": {"enum": ["disabled", "token"]},
                            "secretName": {"type": "string"},
                            "enableK8sTokenAuth": {"type": "boolean"}}),
    "headServiceAnnotations": _STR_MAP, "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"}, "gcsFaultToleranceOptions": _ANY_OBJECT,
    "upgradeStrategy": _ANY_OBJECT, "networkPolicy": _ANY_OBJECT, "tlsOptions": _ANY_OBJECT,
}, ("headGroupSpec",))
RAY_JOB_SPEC = _strict({
    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
    "jobId": {"type": "string"},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _INT,
    "activeDeadlineSeconds": _INT, "backoffLimit": _INT, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "clusterSelector": _STR_MAP, "submitterPodTemplate": _ANY_OBJECT,
    "submitterConfig": _ANY_OBJECT, "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"}, "entrypointResources": {"type": "string"},
    "metadata": _STR_MAP, "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
    "deletionStrategy": _ANY_OBJECT, "schedule": {"type": "string"},
}, ("entrypoint",))
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
RAY_KINDS = {
    kind: _strict({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                   "metadata": {"type": "object", "properties": {"name": _NAME},
                                "required": ["name"]},
                   "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))
    for kind, spec in (("RayCluster", RAY_CLUSTER_SPEC), ("RayJob", RAY_JOB_SPEC))
}


def k8s_validator(definition: str) -> jsonschema.Validator:
    """A strict validator of one Kubernetes type (e.g. ``podtemplatespec-v1``) from the
    schemas that kubernetes-validate ships."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    folder = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict"
    schema = utils.schema_contents(f"{folder}/{definition}.json", K8S_VERSION)
    defs = utils.schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kuberay_docs() -> list[tuple[str, dict]]:
    out = []
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for name, doc in kuberay_docs():
        if doc["kind"] == "RayCluster":
            out.append((name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append((name, doc["spec"]["rayClusterSpec"]))
    return out


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"])] + \
        [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]


def test_kuberay_files_hold_a_raycluster_a_rayjob_and_mlflow():
    kinds = sorted(doc["kind"] for _, doc in kuberay_docs())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "RayJob", "Service",
                     "ServiceAccount"]


@pytest.mark.parametrize("name, doc", kuberay_docs(), ids=[n for n, _ in kuberay_docs()])
def test_kuberay_objects_pass_the_kubernetes_schemas(name, doc):
    import kubernetes_validate

    if doc["kind"] in RAY_KINDS:
        jsonschema.validate(doc, RAY_KINDS[doc["kind"]])
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        validator = k8s_validator("podtemplatespec-v1")
        for group, template in pod_templates(spec):
            errors = [f"{group}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validator.iter_errors(template)]
            assert not errors, errors
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kubernetes_check_catches_a_typo_in_a_pod_template():
    _, spec = cluster_specs()[0]
    template = copy.deepcopy(spec["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = []  # volumeMounts misspelt
    assert list(k8s_validator("podtemplatespec-v1").iter_errors(template))
    bad = copy.deepcopy(spec)
    bad["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAY_CLUSTER_SPEC)


@pytest.mark.parametrize("name, spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_kuberay_clusters_have_a_cpu_head_gpu_workers_token_auth_and_a_shared_volume(name,
                                                                                       spec):
    assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    (gpu,) = spec["workerGroupSpecs"]
    assert 0 <= gpu["minReplicas"] <= gpu.get("replicas", 0) <= gpu["maxReplicas"]
    claims = set()
    for group, template in pod_templates(spec):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), group
        assert volumes[mounts[SHARED["kuberay"]]]["persistentVolumeClaim"]
        claims.add(volumes[mounts[SHARED["kuberay"]]]["persistentVolumeClaim"]["claimName"])
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["DIFFTUNE_SHARED_PATHS"] == SHARED["kuberay"], group
        if group != "head":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pvcs = {doc["metadata"]["name"]: doc for _, doc in kuberay_docs()
            if doc["kind"] == "PersistentVolumeClaim"}
    (claim,) = claims
    assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_one_ray_version_everywhere():
    versions = {spec["rayVersion"] for _, spec in cluster_specs()}
    for path in [*LAUNCHERS.values(), CLUSTER / "Dockerfile"]:
        versions |= set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", path.read_text()))
    assert len(versions) == 1, versions


def test_the_rayjob_entrypoint_is_a_difftune_search_that_reaches_everything():
    from difftune.search.cli import build_parser

    (job,) = [doc for _, doc in kuberay_docs() if doc["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["difftune", "search"]
    args = build_parser().parse_args(argv[1:])
    assert args.storage.startswith(SHARED["kuberay"] + "/")
    assert args.checkpoint.startswith(SHARED["kuberay"] + "/")
    assert args.cache.startswith(("s3://", "gs://"))
    assert args.tracking_uri == "http://mlflow:5000"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["DIFFTUNE_SHARED_PATHS"] == SHARED["kuberay"]
    from difftune.search.space.spec import preset_names

    assert args.space in preset_names()


def test_mlflow_server_is_reachable_by_its_service_name():
    docs = {doc["kind"]: doc for _, doc in kuberay_docs()}
    deployment, service = docs["Deployment"], docs["Service"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    # the store and the bucket reach mlflow server through its environment (the Secret),
    # never as arguments, which would put the database password on its command line
    assert "MLFLOW_BACKEND_STORE_URI" not in args and "--backend-store-uri" not in args
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow"}}]
    hosts = re.search(r"--allowed-hosts=(\S+)", args)[1].split(",")
    name = service["metadata"]["name"]
    port = service["spec"]["ports"][0]["port"]
    assert f"{name}:{port}" in hosts and f"http://{name}:{port}" == "http://mlflow:5000"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


# ------------------------------------------------------- the tracking server's password

#: ``scheme://user:password@`` in a URI
USERINFO_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^@\s/'\"]+@")


def test_basic_auth_is_an_app_the_installed_mlflow_serves():
    from importlib.metadata import entry_points

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}


def test_launchers_start_mlflow_with_basic_auth_and_the_driver_logs_in_from_a_file(launcher):
    name, cfg = launcher
    head = " ".join(cfg["head_start_ray_commands"])
    server = head[head.index("mlflow server"):]
    assert "mlflow server --app-name basic-auth --host 0.0.0.0" in server
    # the admin, the session key and the clients' login come from files the user writes
    assert cfg["file_mounts"]["~/.difftune/mlflow.env"] == "~/.difftune/mlflow.env"
    assert cfg["file_mounts"]["~/.difftune/mlflow-client.env"] == "~/.difftune/mlflow-client.env"
    (ray_head,) = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    login = "set -a; . ~/.difftune/mlflow-client.env; set +a;"
    assert login in ray_head and ray_head.index(login) < ray_head.index("ray start --head")
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "mlflow" not in worker  # workers never talk to MLflow
    text = LAUNCHERS[name].read_text()
    for secret in ("MLFLOW_AUTH_ADMIN_PASSWORD=", "MLFLOW_TRACKING_PASSWORD=",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY="):
        assert secret not in text, secret
    assert not USERINFO_PASSWORD.search(text)


def test_kuberay_mlflow_asks_for_a_password_from_secrets_only():
    docs = {doc["kind"]: doc for _, doc in kuberay_docs()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--app-name=basic-auth" in container["args"]
    # the admin and the session key: the Secret "mlflow" (envFrom); no value inline
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow"}}]
    env = {e["name"]: e for e in container["env"]}
    assert not [n for n, e in env.items()
                if re.search("PASSWORD|SECRET|TOKEN", n) and "value" in e], env
    # basic_auth.ini (where the users are kept) from a Secret, mounted read-only
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config.parent]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-auth"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # open under basic-auth


@pytest.mark.parametrize("name, spec", cluster_specs(), ids=[n for n, _ in cluster_specs()])
def test_the_kuberay_driver_logs_in_to_mlflow_from_a_secret(name, spec):
    """The driver runs on the head: its MLflow login comes from the Secret "mlflow-client";
    no worker pod holds it (workers never talk to MLflow)."""
    for group, template in pod_templates(spec):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        login = {k: env.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        if group == "head":
            for key, e in login.items():
                assert e is not None and "value" not in e, (group, key)
                assert e["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": key}
        else:
            assert login == dict.fromkeys(login), group


def test_no_password_inline_in_any_cluster_file():
    for path in [*LAUNCHERS.values(), *KUBERAY, CLUSTER / "Dockerfile"]:
        code = "\n".join(line.split(" #")[0] for line in path.read_text().splitlines()
                         if not line.lstrip().startswith("#"))  # comments may name them
        assert not USERINFO_PASSWORD.search(code), path
        assert not re.search(r"(PASSWORD|SECRET_KEY)\s*[=:]\s*[\"']?\w", code), path


def _readme_blocks(lang: str) -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    return [textwrap.dedent(b) for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def test_no_command_in_the_readme_puts_a_password_on_its_command_line():
    """A password in a command (kubectl --from-literal, a URI, an env assignment, a
    here-document) is in `ps` and in the shell's history: the README's commands read
    passwords from files and the environment only."""
    commands = _readme_blocks("bash")
    assert len(commands) > 10
    for block in commands:
        assert not USERINFO_PASSWORD.search(block), block
        assert "--from-literal" not in block, block
        assert not re.search(r"PASSWORD=\S", block), block
        assert not re.search(r"<<\s*'?EOF", block) or "PASSWORD" not in block, block
    lines = [line for b in commands for line in b.replace("\\\n", " ").splitlines()]
    for argv in (shlex.split(line.split(" #")[0]) for line in lines
                 if line.strip().startswith("difftune ")):
        assert not any(USERINFO_PASSWORD.search(a) for a in argv), argv


def test_the_readmes_basic_auth_ini_is_what_mlflow_reads(tmp_path, monkeypatch):
    import importlib.util

    import mlflow

    # mlflow's own reader (mlflow/server/auth/config.py), without the auth app's package,
    # whose import needs Flask-WTF (mlflow[auth], installed on the servers, not here)
    path = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read_auth_config = module.read_auth_config
    (ini,) = _readme_blocks("ini")
    (tmp_path / "basic_auth.ini").write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    config = read_auth_config()
    assert config.database_uri.startswith("postgresql://") and config.admin_username == "admin"
    assert config.admin_password is None  # it comes from the Secret's environment
    assert config.default_permission == "READ"


def test_the_readme_documents_the_client_side_of_basic_auth():
    text = " ".join((CLUSTER / "README.md").read_text().split())
    for needle in ("--app-name basic-auth", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY", "set -a; . ~/.difftune/mlflow-client.env; set +a",
                   "create secret generic mlflow-client --from-env-file=mlflow-client.env",
                   "--from-file=basic_auth.ini"):
        assert needle in text, needle


# ----------------------------------------------------------------------- the stand-ins


def test_standin_space_loads_and_allows_retries():
    from difftune.search.space.spec import load_space

    space = load_space(str(CLUSTER / "standin-space.yaml"))
    s = space.search
    assert s["max_failures"] >= 1 and s["max_concurrent"] == 2 and s["cpus_per_trial"] == 1
    assert s["grace_period"] == space.fixed["epochs"]  # ASHA stops nothing


def test_readme_names_the_files_and_commands_the_tests_use():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml",
                   "cluster/kuberay/rayjob.yaml", "cluster/kuberay/mlflow.yaml",
                   "cluster/standin-space.yaml", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH",
                   "ray start --head", "ray job submit", "--working-dir", "difftune search --address",
                   "mlflow server", "--backend-store-uri", "python -m moto.server",
                   "DIFFTUNE_SHARED_PATHS", "endpoint_override", "allow_delayed_open=true",
                   "python -m pytest -q tests/cluster"):
        assert needle in text, needle
    assert os.path.basename(__file__) in text
