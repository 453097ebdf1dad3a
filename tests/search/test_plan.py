"""``difftune plan`` and the plan ``difftune search`` makes first: ImageNet-1k arithmetic
without the checkpoint or the data, the policy under a budget, refusals before anything is
written, sizes, and entry sizes checked against entries the cache really writes."""

from __future__ import annotations

import json

import pytest

from difftune.search.cli import main
from difftune.search.plan.estimate import DataSize, make_plan
from difftune.search.plan.sizes import format_size, parse_size
from difftune.search.space.spec import load_space
from difftune.trainables.errors import UserError

IMAGENET = ["--images", "1281167", "--classes", "1000"]
TRAIN, VAL = 1_281_167, 50_000


@pytest.fixture(scope="module")
def linear_2tb() -> dict:
    """The plan of spaces/linear.yaml on ImageNet-1k with a 2 TB budget, as JSON holds it."""
    data = DataSize(train_all=TRAIN, val=VAL, classes=1000, source="imagenet")
    plan = make_plan(load_space("linear"), data, budget=2 * 10**12, budget_source="test")
    return json.loads(json.dumps(plan.to_dict()))


def plan_json(capsys, *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip() else None, err


def test_linear_on_imagenet_fits_2tb_with_one_pass_per_trial(capsys, tmp_path):
    rc, plan, err = plan_json(capsys, "--space", "linear", *IMAGENET, "--cache-budget", "2TB",
                              "--cache", str(tmp_path / "none"))
    assert rc == 0, err
    for key in ("unet_image_passes", "unet_image_passes_paper", "gflops_per_image",
                "activation_bytes_per_image", "cache_bytes_bound", "policy", "entries",
                "gpu_hours"):
        assert key in plan
    assert plan["policy"] == "per-request" and plan["fits"]
    assert plan["cache_bytes_bound"] <= 2 * 10**12
    assert plan["working_set_bytes"] <= 2 * 10**12 < plan["cache_bytes_unevicted"]
    # at most one U-Net pass over the data per trial; the paper's way: one per epoch
    assert plan["unet_image_passes"] == 60 * (TRAIN + VAL)
    assert plan["unet_image_passes_paper"] == 28 * plan["unet_image_passes"]
    assert plan["timesteps"] == list(range(0, 501, 10)) and plan["blocks"] == list(range(1, 38))
    assert plan["gflops_per_image"] == pytest.approx(2238, rel=0.01)  # to block 37
    assert plan["gpu_hours"] == pytest.approx(
        plan["unet_image_passes"] / plan["img_per_s"] / 3600)
    assert set(plan["entries"][0]) >= {"t", "block", "pool", "dtype", "bytes"}
    assert len(plan["entries"]) == 51 * 37 * 4 * 2  # every (t, block, pool), train and val


def test_entry_sizes_match_hand_arithmetic(linear_2tb):
    by = {(e["split"], e["t"], e["block"], e["pool"]): e for e in linear_2tb["entries"]}
    # block 24 (1024 x 16 x 16), pool 2, float16: 1024 x 2 x 2 x 2 bytes per image, ~10.5 GB
    e = by[("train", 150, 24, 2)]
    assert e["dtype"] == "float16" and e["rows"] == TRAIN
    assert e["bytes"] == TRAIN * (1024 * 2 * 2 * 2 + 16)
    assert e["bytes"] / 1e9 == pytest.approx(10.5, abs=0.05)
    # block 1 (256 channels), pool 1; block 19 (1024, the 8 x 8 middle), pool 8; block 37
    # (256), pool 4; the val split: 50 per class
    assert by[("train", 0, 1, 1)]["bytes"] == TRAIN * (256 * 1 * 2 + 16)
    assert by[("train", 90, 19, 8)]["bytes"] == TRAIN * (1024 * 64 * 2 + 16)
    assert by[("train", 500, 37, 4)]["bytes"] == TRAIN * (256 * 16 * 2 + 16)
    assert by[("val", 90, 30, 2)]["bytes"] == VAL * (512 * 4 * 2 + 16)


def test_linear_with_100gb_is_refused_naming_what_would_fit(capsys, tmp_path):
    capsys.readouterr()
    rc = main(["plan", "--space", "linear", *IMAGENET, "--cache-budget", "100GB",
               "--cache", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "100 GB (--cache-budget)" in err[0] and "changes that fit: label_fraction" in err[0]
    # the change it names does fit
    frac = err[0].split("label_fraction: ")[1].split()[0]
    rc, plan, _ = plan_json(capsys, "--space", "linear", *IMAGENET, "--cache-budget", "100GB",
                            "--set", f"label_fraction={frac}", "--cache", str(tmp_path / "none"))
    assert rc == 0 and plan["fits"] and plan["cache_bytes_bound"] <= 100 * 10**9


def test_block_set_when_it_fits_and_the_changes_that_make_it_fit():
    space = load_space("linear", overrides={"t": 90})
    data = DataSize(train_all=TRAIN, val=VAL, classes=1000, source="imagenet")
    roomy = make_plan(space, data, budget=10**15, budget_source="test")
    # one timestep: the 37 blocks at pool 8, train and val; one pass over the data
    per_image = sum(e["bytes"] for e in roomy.entries if e["split"] == "train") / TRAIN
    assert roomy.policy == "block-set" and roomy.store_pool == 8
    assert per_image == pytest.approx(2.78e6, rel=0.01)  # the issue's ~2.8 MB per image
    assert roomy.cache_bytes_bound == sum(e["bytes"] for e in roomy.entries)
    assert roomy.unet_image_passes == TRAIN + VAL
    forced = load_space("linear", overrides={"t": 90})
    forced.search["cache_policy"] = "block-set"
    tight = make_plan(forced, data, budget=2 * 10**12, budget_source="test")
    assert not tight.fits
    assert any(c.startswith("cache_pool: 4") for c in tight.changes)
    assert any(c.startswith("cache_policy: per-request") for c in tight.changes)


def test_plan_of_a_folder_counts_its_images_and_needs_no_checkpoint(tmp_path, capsys):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / f"{i}.png")
    rc, plan, err = plan_json(capsys, "--space", "attention", "--data", str(tmp_path),
                              "--cache", str(tmp_path / "cache"))
    assert rc == 0, err
    # ImageNet's layout: val (selection) is a holdout of train/ (1 of 3 per class)
    assert plan["data"]["train_images"] == 4 and plan["data"]["val_images"] == 2
    assert plan["budget_source"].startswith("free space of")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, message", [
    (["--images", "100"], "--images and --classes go together"),
    (["--cache-budget", "lots"], "--cache-budget='lots' is not a size"),
    (["--data", "digits", "--images", "5", "--classes", "2"], "either --data or --images"),
])
def test_bad_plan_arguments_are_one_line(capsys, argv, message):
    capsys.readouterr()
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_sizes():
    assert parse_size("500GB") == 500 * 10**9
    assert parse_size("2TB") == 2 * 10**12
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("750 MiB") == 750 * 2**20 and parse_size(4096) == 4096
    for bad in ("2XB", "-1GB", "0", "", True):
        with pytest.raises(UserError):
            parse_size(bad)
    assert format_size(10_515_818_736) == "10.5 GB" and format_size(2e12) == "2 TB"


def test_search_over_budget_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    rc = main(["search", "--cache-budget", "20MB", "--tracking-uri",
               f"sqlite:///{tmp_path}/mlflow.db", "--storage", str(tmp_path / "runs"),
               "--cache", str(tmp_path / "cache")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out.strip().startswith("plan: ")  # the plan's one-line summary first
    err = err.strip().splitlines()
    assert len(err) == 1 and "20 MB (--cache-budget)" in err[0]
    assert "changes that fit: label_fraction: 0.1" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_planned_entries_are_what_the_cache_writes(tmp_path):
    """The demo plan (block-set, cache_pool 4) at one timestep against a real miss: the same
    19 entries, of the planned sizes (the Arrow file adds under 1%)."""
    from difftune.search.plan.estimate import data_size
    from difftune.trainables.cache.admin import list_entries
    from difftune.trainables.cache.feature_cache import FeatureCache
    from difftune.trainables.config import TrialConfig

    space = load_space("demo", overrides={"t": 90, "head": "linear", "label_fraction": 0.3})
    plan = make_plan(space, data_size(space), budget=None, budget_source="test")
    assert plan.policy == "block-set" and plan.store_pool == 4
    planned = {(e["block"], e["pool"]): e for e in plan.entries if e["split"] == "train"}
    assert len(planned) == 19
    cache = FeatureCache(str(tmp_path), store_pool=plan.store_pool, extra_blocks=plan.blocks)
    cache.get(TrialConfig(label_fraction=0.3), "train", [(90, 2, 2)])
    written = {(e["block"], e["pool"]): e for e in list_entries(str(tmp_path))}
    assert written.keys() == planned.keys()
    for key, e in written.items():
        assert e["rows"] == planned[key]["rows"] == plan.data["train_rows"]
        assert planned[key]["bytes"] <= e["bytes"] < 1.01 * planned[key]["bytes"], key


def test_a_search_extracts_first_only_when_its_trials_may_ask_every_timestep():
    from difftune.search.plan.estimate import extraction
    from difftune.search.run.extract import Workers, why_not

    data = DataSize(train_all=TRAIN, val=VAL, classes=1000, source="imagenet")
    two = Workers(2, {"num_gpus": 1}, "gpu")
    few = load_space("linear", search_overrides={"trials": 4})  # 51 timesteps, 4 trials
    plan = make_plan(few, data, budget=10**16, budget_source="test")
    ahead = extraction(plan)
    assert plan.policy == "block-set" and not ahead["worth_it"]
    assert ahead["image_passes"] == 51 * (TRAIN + VAL) > plan.unet_image_passes
    assert "51 timesteps for 4 trials" in why_not(plan, few, two)
    assert why_not(plan, few, None) is None  # `difftune extract --space` does what it is told
    assert "one worker" in why_not(plan, few, Workers(1))
    many = load_space("linear", overrides={"t": 90}, search_overrides={"trials": 4})
    plan = make_plan(many, data, budget=10**16, budget_source="test")
    assert extraction(plan)["worth_it"] and why_not(plan, many, two) is None


def test_views_count_in_the_passes_and_bytes():
    """``views: K`` caches K views of every train image (one of val): K train passes per
    timestep and K times the train entries' bytes; the paper's way stores none, so its passes
    do not change."""
    data = DataSize(train_all=TRAIN, val=VAL, classes=1000, source="imagenet")
    one = make_plan(load_space("linear"), data).to_dict()
    four = make_plan(load_space("linear", overrides={"views": 4}), data).to_dict()
    assert one["policy"] == four["policy"] == "block-set"
    assert four["data"]["train_views"] == 4 and one["data"]["train_views"] == 1
    per_image = one["unet_image_passes"] // (TRAIN + VAL)
    assert four["unet_image_passes"] == per_image * (4 * TRAIN + VAL)
    assert four["unet_image_passes_paper"] == one["unet_image_passes_paper"]
    train_bytes = sum(e["bytes"] for e in one["entries"] if e["split"] == "train")
    val_bytes = sum(e["bytes"] for e in one["entries"] if e["split"] == "val")
    assert sum(e["bytes"] for e in four["entries"]) == 4 * train_bytes + val_bytes
    assert sorted({e["view"] for e in four["entries"] if e["split"] == "train"}) == [0, 1, 2, 3]
    assert four["cache_bytes_bound"] > 3 * one["cache_bytes_bound"]
