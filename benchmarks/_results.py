"""Shared by the benchmark scripts: append one result row (date, machine, summary) to
``benchmarks/RESULTS.md`` and print the summary as the script's last line,
``NAME key=value ...``."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from importlib.machinery import ModuleSpec
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Rows are appended by the scripts in `benchmarks/` (through `benchmarks/_results.py`): when,
on what machine, and the script's summary line. Figures from different machines are not
comparable.

| date (UTC) | machine | result |
| --- | --- | --- |
"""


def machine() -> str:
    """CPU architecture and count, GPU (when torch sees one) and torch version."""
    parts = [f"{platform.machine()} x{os.cpu_count()} CPU"]
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            parts.append(torch.cuda.get_device_name(0))
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__.split('+')[0]}")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace(" ", "_")


def mean_ci(values, *, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its 95 % percentile bootstrap
    interval (``reps`` resamples, seeded)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(reps, len(arr)))].mean(axis=1)
    return float(arr.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def record(name: str, **values: object) -> str:
    """Append ``name key=value ...`` with the date and machine to RESULTS.md; print it.

    :return: the summary line.
    """
    line = " ".join([name, *(f"{k}={fmt(v)}" for k, v in values.items())])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    with RESULTS.open("a") as f:
        f.write(f"| {date} | {machine()} | `{line}` |\n")
    print(line, flush=True)
    return line


def arguments(spec: ModuleSpec | None, doc: str | None) -> argparse.ArgumentParser:
    """The command line of the benchmark whose module has ``spec`` and docstring ``doc``:
    its usage names ``python -m benchmarks.NAME``, its description is the docstring's first
    paragraph."""
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])


def configure(*, verbose: bool = False) -> None:
    """Logging for a run (INFO with times when ``verbose``, else warnings only); Ray, if the
    benchmark starts it, sends no usage statistics."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
