"""Bookkeeping at scale: on a generated ImageFolder of small images (10,000, then 100,000
train images in 100 classes), the time to fingerprint the data files (once per search, on
the driver: relative paths + sizes, and with ``--data-hash content``), and a trial's time to
open a cached entry of every train image: in a fresh process, with the fingerprint handed
over, the first open on a node (which reads the entry whole to verify its checksum) and a
later one (verified already on this node), against the old way (the data walked at every
lookup, the entry read whole by every process).

    python -m benchmarks.fingerprint_open [--sizes 10000,100000] [--keep DIR]

The images are generated in a temporary folder (about 400 MB on disk at 100,000) and deleted
afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._results import arguments, configure, record

logger = logging.getLogger("fingerprint_open")
CLASSES = 100

# a trial process (a reused Ray worker) has its imports and its U-Net already: the time
# measured is what opening the entry costs on top (data listing, fingerprint, lookup, check)
OPEN = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import pandas, torchvision.datasets, torchvision.transforms
from difftune.trainables.cache.feature_cache import FeatureCache, model_key
from difftune.trainables.config import TrialConfig
from difftune.trainables.model.features import block_sizes
from difftune.trainables.model.unet import shared_unet
block_sizes(shared_unet("demo", None, "cpu")[0])
model_key("demo", None)
start = time.perf_counter()
cache = FeatureCache(spec["cache"], data_files=spec["files"], batch_size=512)
ds = cache.get(TrialConfig(data=spec["data"]), "train", [(90, 2, 16)])
done = time.perf_counter()
print(json.dumps({"open_s": done - start, "rows": len(ds),
                  "written": cache.stats.entries_written}))
"""


def grow(root: Path, n: int) -> None:
    """ImageFolder ``root`` with ``n`` 8x8 PNGs in train/ (100 classes) and 10 per class in
    val/ (kept as it is when it exists)."""
    from PIL import Image

    for c in range(CLASSES):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (c * 2, 255 - c * 2, (c * 37) % 256)).save(buf, "PNG")
        png = buf.getvalue()
        for split, count in (("train", n // CLASSES), ("val", 10)):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            have = len(os.listdir(folder))
            for i in range(have, count):
                (folder / f"{i:06d}.png").write_bytes(png)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def open_entry(cache: str, data: str, files: dict | None, env: dict | None = None) -> dict:
    spec = json.dumps({"cache": cache, "data": data, "files": files})
    out = subprocess.run([sys.executable, "-c", OPEN, spec], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__spec__, __doc__)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--keep", help="generate into this folder and keep it")
    args = parser.parse_args(argv)
    configure(verbose=True)
    from difftune.trainables.data.datasets import files_fingerprint

    work = Path(args.keep or tempfile.mkdtemp(prefix="difftune-fp-"))
    values: dict[str, object] = {}
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            data, cache = work / "data", str(work / f"cache-{n}")
            gen_s, _ = timed(grow, data, n)
            logger.info("%d images generated in %.0f s", n, gen_s)
            fp_s, files = timed(lambda root: {s: files_fingerprint(root, s) for s in
                                              ("train", "val")}, str(data))
            content_s, _ = timed(files_fingerprint, str(data), "train", data_hash="content")
            verified = str(work / f"verified-{n}")
            # the miss that writes the entry (demo U-Net, block 2 unpooled: 32 x 16 x 16
            # float16, 16 kB per image) verifies it too
            first = open_entry(cache, str(data), files, {"DIFFTUNE_VERIFIED_DIR": verified})
            assert first["written"] == 1 and first["rows"] == n, first
            shutil.rmtree(verified)  # as on another node
            cold = open_entry(cache, str(data), files, {"DIFFTUNE_VERIFIED_DIR": verified})
            warm = open_entry(cache, str(data), files, {"DIFFTUNE_VERIFIED_DIR": verified})
            old = open_entry(cache, str(data), None,
                             {"DIFFTUNE_VERIFIED_DIR": str(work / "never")})
            shutil.rmtree(work / "never", ignore_errors=True)
            k = f"{n // 1000}k"
            values.update({f"fingerprint_{k}_s": fp_s, f"content_hash_{k}_s": content_s,
                           f"open_{k}_first_on_node_s": cold["open_s"],
                           f"open_{k}_s": warm["open_s"],
                           f"open_{k}_walk_and_verify_s": old["open_s"]})
            logger.info("%d images: fingerprint %.2f s (content %.2f s); open %.2f s first on "
                        "a node, %.2f s later, %.2f s walking + verifying every time", n, fp_s,
                        content_s, cold["open_s"], warm["open_s"], old["open_s"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    values["entry"] = "demo_block2_pool16_16kB_per_image"
    record("fingerprint_open", **values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
