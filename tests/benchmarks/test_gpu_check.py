"""``python -m benchmarks.gpu_check --small``: the GPU check's steps on the CPU (demo U-Net,
bf16 autocast, the float16 cache store, a 3-trial search), run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository root: benchmarks/ is below it


@pytest.mark.slow
def test_small_gpu_check(tmp_path):
    out = tmp_path / "check.json"
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--small",
                           "--no-record", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = json.loads(out.read_text())
    # bf16 features (and those stored by a bf16 cache miss) are close to fp32 ones
    assert values["bf16_rel_err"] < 0.02 and values["cache_rel_err"] < 0.02
    assert values["bf16_rel_err"] > 0  # bf16 really ran: its rounding shows
    # the entry a bf16 miss wrote holds float16, under a bf16 key, one row per train image
    assert values["cache_dtype"] == "float16" and values["cache_bf16_group"]
    assert values["cache_rows"] == 1078
    assert values["fp32_batch"] >= 1 and values["images"] == 32  # batch from free memory
    assert values["search_rc"] == 0 and values["trials_finished"] == 3
    assert values["search_precision"] == "fp32"  # CPU trials extract in fp32
    assert values["ok"] is True
    assert (results.read_bytes() if results.exists() else None) == before  # --no-record
