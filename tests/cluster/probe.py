"""A Ray driver that probes the stand-in cluster from inside (run by test_cluster.py):

1. the feature cache on S3: a task pinned to the worker node extracts and publishes an entry,
   then a task pinned to the head node gets the same features; each reports its cache
   statistics, the mirror folder it read through and a checksum of the features;
2. ``search.cluster.check_addressable`` against the cluster's real ``ray.nodes()``;
3. ``search.cluster.check_inputs_on_nodes`` with a path every node has and one none has.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import ray


@ray.remote(num_cpus=1, max_retries=0)
def cache_get(root: str) -> dict:
    import tempfile

    import torch

    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.config import TrialConfig

    cache = FeatureCache(root)
    # its own noise seed: entries no search of the tests asks for
    cfg = TrialConfig(model="demo", data="digits", label_fraction=0.05, noise_seed=7)
    ds = cache.get(cfg, "train", [(90, 4, 2)])
    x = torch.stack([ds[i][0][(90, 4)] for i in range(len(ds))]).float()
    return {"node_id": ray.get_runtime_context().get_node_id(), "stats": cache.stats.as_dict(),
            "mirror": cache.mirror, "tmpdir": tempfile.gettempdir(),
            "mirror_files": sorted(os.listdir(cache.mirror)) if os.path.isdir(cache.mirror)
            else [], "rows": len(ds),
            "sha": hashlib.sha256(x.numpy().tobytes()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--shared", required=True, help="a folder declared shared")
    ap.add_argument("--tracking-uri", required=True)
    args = ap.parse_args()
    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    from difftune.search.run.cluster import ClusterError, check_addressable, check_inputs_on_nodes

    out: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    writer = ray.get(cache_get.options(resources={"worker_node": 0.01}).remote(args.cache))
    reader = ray.get(cache_get.options(resources={"head_node": 0.01}).remote(args.cache))
    out["writer"], out["reader"] = writer, reader

    checks: dict[str, str] = {}

    def attempt(name: str, fn, **kw) -> None:
        try:
            fn(**kw)
            checks[name] = "ok"
        except ClusterError as exc:
            checks[name] = str(exc)

    attempt("shared", check_addressable, storage_path=os.path.join(args.shared, "runs"),
            cache=args.cache, tracking_uri=args.tracking_uri)
    attempt("sqlite_in_shared", check_addressable, storage_path=args.cache,
            cache=os.path.join(args.shared, "cache"),
            tracking_uri=f"sqlite:///{args.shared}/mlflow.db")
    attempt("not_shared", check_addressable, storage_path="/var/tmp/difftune-local/runs",
            cache=args.cache, tracking_uri=args.tracking_uri)
    # the default store, in the (shared) working directory, but without the declaration
    attempt("default_tracking", check_addressable, storage_path=args.cache, cache=None,
            tracking_uri="sqlite:///mlflow.db", env={})
    attempt("inputs_present", check_inputs_on_nodes, inputs={"--checkpoint": sys.executable})
    attempt("inputs_missing", check_inputs_on_nodes,
            inputs={"--data": "/nonexistent/imagenet", "--model": "demo"})
    out["checks"] = checks
    print(json.dumps(out))


if __name__ == "__main__":
    main()
