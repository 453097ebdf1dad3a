"""Sharded extraction as ``difftune search`` runs it before its trials: on the search's
console, progress lines (images/s, time left, a closing line) instead of a bar."""

from __future__ import annotations

import logging

from difftune.search.run.extract import Workers, ray_runner
from difftune.trainables.cache.feature_cache import FeatureCache
from difftune.trainables.cache.shard import extract_sharded
from difftune.trainables.config import TrialConfig


def test_sharded_extraction_says_its_progress_in_lines(ray_session, tmp_path, caplog):
    cache = FeatureCache(str(tmp_path / "cache"), batch_size=16, precision="fp32")
    runner = ray_runner(Workers(2, {"num_cpus": 1}), progress=False, lines_s=0)
    with caplog.at_level(logging.INFO, logger="difftune"):
        counts = extract_sharded(cache, TrialConfig(label_fraction=0.05), "train",
                                 [(10, 4, 2)], shards=2, runner=runner)
    assert counts["written"] == 1
    lines = [r.getMessage() for r in caplog.records
             if r.name == "difftune.trainables.progress"]
    assert lines, caplog.text
    assert all(line.startswith("extract train t=10") and "[2 shards]" in line
               for line in lines), lines
    assert f"{counts['images']:,} images in" in lines[-1] and "img/s" in lines[-1], lines
