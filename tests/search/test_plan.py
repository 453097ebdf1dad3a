"""``difftune plan`` and the plan ``difftune search`` makes first: ImageNet-1k arithmetic
without the checkpoint or the data, the policy under a budget and by GPU-hours, the paper's
way priced per block and at the epochs ASHA lets a trial run, the splits by their own rule
(test apart), a search's command line, refusals before anything is written, sizes, and
entry sizes checked against entries the cache really writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from difftune.search.cli import main
from difftune.search.plan.arithmetic import model_flags
from difftune.search.plan.data import DataSize
from difftune.search.plan.estimate import data_size, make_plan
from difftune.search.plan.stopping import asha_rungs, early_stopping
from difftune.search.space.sizes import format_size, parse_size
from difftune.search.space.spec import Space, load_space
from difftune.trainables.errors import UserError
from difftune.trainables.model.cost import unet_costs

ROOT = Path(__file__).resolve().parents[2]
IMAGENET = ["--images", "1281167", "--classes", "1000"]
IMAGES, CLASSES, TEST = 1_281_167, 1000, 50_000
# the splits' rule (trainables/data/splits.py) for train/ + val/ without test/: val (selection)
# is a 0.1 holdout of train/ (round(0.1 * 1281) = round(0.1 * 1282) = 128 of each class),
# test is val/ (ImageNet's 50,000)
VAL = 128 * CLASSES
TRAIN = IMAGES - VAL
#: ASHA(grace 7, reduction 3, max_t 28): rungs 7 and 21, a third then a ninth go on
E_LINEAR = 7 + (21 - 7) / 3 + (28 - 21) / 9


def imagenet(space: str = "linear", **kw) -> DataSize:
    return data_size(load_space(space, **kw), images=IMAGES, classes=CLASSES)


def single(**kw) -> Space:
    """spaces/linear.yaml without its rungs over images: the single-fidelity search."""
    space = load_space("linear", **kw)
    space.search["image_rungs"] = None
    return space


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory) -> str:
    """spaces/linear.yaml without its rungs over images, as a file still named linear.yaml."""
    text = (ROOT / "spaces" / "linear.yaml").read_text().splitlines()
    path = tmp_path_factory.mktemp("single") / "linear.yaml"
    path.write_text("\n".join(line for line in text if not line.strip().startswith(
        ("image_rungs:", "image_floor:", "probe_rung:"))) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def linear_2tb() -> dict:
    """The plan of spaces/linear.yaml on ImageNet-1k with a 2 TB budget, as JSON holds it."""
    plan = make_plan(single(), imagenet(), budget=2 * 10**12, budget_source="test")
    return json.loads(json.dumps(plan.to_dict()))


@pytest.fixture(scope="module")
def gflops_to() -> dict[int, float]:
    """GFLOPs per image of a pass to each block of paper256 (counted on the meta device)."""
    return {b: c.gflops_to for b, c in unet_costs(model_flags(single())).items()}


def plan_json(capsys, *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip() else None, err


def test_linear_on_imagenet_fits_2tb_with_one_pass_per_trial(capsys, tmp_path, linear_file):
    rc, plan, err = plan_json(capsys, "--space", linear_file, *IMAGENET, "--cache-budget", "2TB",
                              "--cache", str(tmp_path / "none"))
    assert rc == 0, err
    for key in ("unet_image_passes", "unet_image_passes_paper", "gflops_per_image",
                "activation_bytes_per_image", "cache_bytes_bound", "policy", "entries",
                "gpu_hours"):
        assert key in plan
    assert plan["policy"] == "per-request" and plan["fits"]
    assert plan["cache_bytes_bound"] <= 2 * 10**12
    assert plan["working_set_bytes"] <= 2 * 10**12 < plan["cache_bytes_unevicted"]
    # at most one U-Net pass over the data per trial; the paper's way: one per epoch run,
    # at the epochs ASHA lets a trial run in expectation, every epoch beside it
    assert plan["unet_image_passes"] == 60 * (TRAIN + VAL)
    assert plan["expected_epochs"] == pytest.approx(E_LINEAR)
    assert plan["unet_image_passes_paper"] == round(E_LINEAR * plan["unet_image_passes"])
    assert plan["unet_image_passes_paper_bound"] == 28 * plan["unet_image_passes"]
    assert plan["timesteps"] == list(range(0, 501, 10)) and plan["blocks"] == list(range(1, 38))
    assert plan["gflops_per_image"] == pytest.approx(2238, rel=0.01)  # to block 37
    # a per-request miss runs to the trial's own block: 741 GFLOPs on average over 1-37
    assert plan["trial_gflops_per_image"] == pytest.approx(741, rel=0.01)
    assert plan["gpu_hours"] == pytest.approx(
        plan["unet_image_passes"] * plan["trial_gflops_per_image"] / plan["gflops_per_s"] / 3600)
    assert set(plan["entries"][0]) >= {"t", "block", "pool", "dtype", "bytes"}
    assert len(plan["entries"]) == 51 * 37 * 4 * 2  # every (t, block, pool), train and val


def test_entry_sizes_match_hand_arithmetic(linear_2tb):
    by = {(e["split"], e["t"], e["block"], e["pool"]): e for e in linear_2tb["entries"]}
    # block 24 (1024 x 16 x 16), pool 2, float16: 1024 x 2 x 2 x 2 bytes per image, ~9.47 GB
    # for the 1,153,167 train images (train/ less the holdout)
    e = by[("train", 150, 24, 2)]
    assert e["dtype"] == "float16" and e["rows"] == TRAIN
    assert e["bytes"] == TRAIN * (1024 * 2 * 2 * 2 + 16)
    assert e["bytes"] / 1e9 == pytest.approx(9.47, abs=0.01)
    # block 1 (256 channels), pool 1; block 19 (1024, the 8 x 8 middle), pool 8; block 37
    # (256), pool 4; the val split: the holdout of train/
    assert by[("train", 0, 1, 1)]["bytes"] == TRAIN * (256 * 1 * 2 + 16)
    assert by[("train", 90, 19, 8)]["bytes"] == TRAIN * (1024 * 64 * 2 + 16)
    assert by[("train", 500, 37, 4)]["bytes"] == TRAIN * (256 * 16 * 2 + 16)
    assert by[("val", 90, 30, 2)]["bytes"] == VAL * (512 * 4 * 2 + 16)


def test_linear_with_200gb_is_refused_naming_what_would_fit(capsys, tmp_path, linear_file):
    # 8 trials at once of the 128,000 val images at pool 8 need 134 GB whatever the labels
    capsys.readouterr()
    rc = main(["plan", "--space", linear_file, *IMAGENET, "--cache-budget", "200GB",
               "--cache", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "200 GB (--cache-budget)" in err[0] and "changes that fit: label_fraction" in err[0]
    # the change it names does fit
    frac = err[0].split("label_fraction: ")[1].split()[0]
    rc, plan, _ = plan_json(capsys, "--space", linear_file, *IMAGENET, "--cache-budget", "200GB",
                            "--set", f"label_fraction={frac}", "--cache", str(tmp_path / "none"))
    assert rc == 0 and plan["fits"] and plan["cache_bytes_bound"] <= 200 * 10**9


def test_block_set_when_it_fits_and_the_changes_that_make_it_fit():
    space = single(overrides={"t": 90})
    data = imagenet()
    roomy = make_plan(space, data, budget=10**15, budget_source="test")
    # one timestep: the 37 blocks at pool 8, train and val; one pass over the data
    per_image = sum(e["bytes"] for e in roomy.entries if e["split"] == "train") / TRAIN
    assert roomy.policy == "block-set" and roomy.store_pool == 8  # fewer GPU-hours, one t
    assert per_image == pytest.approx(2.78e6, rel=0.01)  # the issue's ~2.8 MB per image
    assert roomy.cache_bytes_bound == sum(e["bytes"] for e in roomy.entries)
    assert roomy.unet_image_passes == TRAIN + VAL
    forced = single(overrides={"t": 90})
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
    # ImageNet's layout: val (selection) is a holdout of train/ (1 of 3 per class), test
    # is val/
    assert plan["data"]["train_images"] == 4 and plan["data"]["val_images"] == 2
    assert plan["data"]["test_images"] == 4 and plan["test"]["images"] == 4
    assert plan["budget_source"].startswith("free space of")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, message", [
    (["--images", "100"], "--images and --classes go together"),
    (["--cache-budget", "lots"], "--cache-budget='lots' is not a size"),
    (["--data", "digits", "--images", "5", "--classes", "2"], "either --data or --images"),
    (["--test-images", "50"], "--images and --classes go together"),
    (["--images", "1000", "--classes", "1000"], "under 2 per class of --classes 1000"),
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

    data = imagenet()
    two = Workers(2, {"num_gpus": 1}, "gpu")
    few = single(search_overrides={"trials": 4})  # 51 timesteps, 4 trials
    few.search["cache_policy"] = "block-set"  # asked for: auto takes per-request (cheaper)
    plan = make_plan(few, data, budget=10**16, budget_source="test")
    ahead = extraction(plan)
    assert plan.policy == "block-set" and not ahead["worth_it"]
    assert ahead["image_passes"] == 51 * (TRAIN + VAL) > plan.unet_image_passes
    assert "51 timesteps for 4 trials" in why_not(plan, few, two)
    assert why_not(plan, few, None) is None  # `difftune extract --space` does what it is told
    assert "one worker" in why_not(plan, few, Workers(1))
    many = single(overrides={"t": 90}, search_overrides={"trials": 4})
    plan = make_plan(many, data, budget=10**16, budget_source="test")
    assert extraction(plan)["worth_it"] and why_not(plan, many, two) is None


def test_views_count_in_the_passes_and_bytes():
    """``views: K`` caches K views of every train image (one of val): K train passes per
    timestep and K times the train entries' bytes; the paper's way stores none, so its passes
    do not change."""
    data = imagenet()
    spaces = [single(), single(overrides={"views": 4})]
    for space in spaces:
        space.search["cache_policy"] = "block-set"
    one, four = (make_plan(space, data).to_dict() for space in spaces)
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


def test_the_papers_way_runs_each_trial_to_its_own_block(gflops_to):
    """Over blocks 1-37 a trial of the paper's way costs the mean of its blocks' GFLOPs, not
    the deepest's: at most 0.6x of the same space pinned to block 37 (about a third)."""
    data = imagenet()
    spread = make_plan(single(), data)
    pinned = make_plan(single(overrides={"block": 37}), data)
    mean = sum(gflops_to[b] for b in range(1, 38)) / 37
    assert spread.trial_gflops_per_image == pytest.approx(mean)
    assert pinned.trial_gflops_per_image == pytest.approx(gflops_to[37])
    assert spread.gpu_hours_paper < 0.6 * pinned.gpu_hours_paper
    assert spread.gpu_hours_paper == pytest.approx(pinned.gpu_hours_paper * mean / gflops_to[37])
    # the paper's way, by hand: trials x images x expected epochs x GFLOPs / rate
    by_hand = 60 * (TRAIN + VAL) * E_LINEAR * mean / spread.gflops_per_s / 3600
    assert spread.gpu_hours_paper == pytest.approx(by_hand)
    assert spread.gpu_hours_paper_bound == pytest.approx(by_hand * 28 / E_LINEAR)
    # block 24 alone: 639 GFLOPs
    assert gflops_to[24] == pytest.approx(639, rel=0.01)


def test_expected_epochs_under_asha_are_rays_rungs_by_the_stated_formula():
    from types import SimpleNamespace

    from ray.tune.schedulers.async_hyperband import _Bracket

    es = early_stopping(7, 3, 28)
    assert es.rungs == (7, 21) == asha_rungs(7, 3, 28)
    assert 7 < es.expected_epochs < 28 and es.expected_epochs == pytest.approx(E_LINEAR)
    assert es.survivors == pytest.approx((1 / 3, 1 / 9))
    assert early_stopping(28, 3, 28).expected_epochs == 28  # grace = max_t: nothing stopped
    assert early_stopping(1, 2, 8).expected_epochs == pytest.approx(1 + 1 / 2 + 2 / 4 + 4 / 8)
    for g, r, t in ((7, 3, 28), (1, 2, 20), (3, 3, 27), (2, 4, 40)):
        bracket = _Bracket(g, t, r, 0)  # Ray Tune's own rungs
        assert tuple(sorted(int(m) for m, _ in bracket._rungs)) == asha_rungs(g, r, t)
    # Ray's scheduler on many trials of random scores stops them as the formula says
    rng = np.random.default_rng(0)
    bracket, epochs = _Bracket(7, 28, 3, 0), []
    for i in range(3000):
        trial, score = SimpleNamespace(trial_id=str(i)), rng.random()
        for epoch in range(1, 29):
            if bracket.on_result(trial, epoch, score) == "STOP" or epoch == 28:
                epochs.append(epoch)
                break
    assert np.mean(epochs) == pytest.approx(E_LINEAR, rel=0.03)


def test_the_cheaper_policy_by_gpu_hours_and_a_policy_asked_for():
    data = imagenet()
    # 51 timesteps, 60 trials: one pass per trial to its own block costs fewer GPU-hours
    # than 51 passes to block 37
    auto = make_plan(single(), data)
    bs, pr = auto.policies["block-set"], auto.policies["per-request"]
    assert bs["fits"] and pr["fits"] and auto.policy == "per-request"
    assert pr["gpu_hours"] < bs["gpu_hours"] and auto.gpu_hours == pytest.approx(pr["gpu_hours"])
    assert pr["cache_bytes"] < bs["cache_bytes"]
    # one timestep: one pass to block 37 for all 60 trials is the cheaper
    one_t = make_plan(single(overrides={"t": 90}), data)
    assert one_t.policy == "block-set"
    assert one_t.policies["block-set"]["gpu_hours"] < one_t.policies["per-request"]["gpu_hours"]
    asked = single()
    asked.search["cache_policy"] = "block-set"
    forced = make_plan(asked, data)
    assert forced.policy == "block-set" and forced.gpu_hours == pytest.approx(bs["gpu_hours"])
    # the paper's way under the same early stopping, against the cheaper policy
    assert 10 < auto.gpu_hours_paper / auto.gpu_hours < 15
    assert 3 < forced.gpu_hours_paper / forced.gpu_hours < 7


def test_imagenet_splits_by_the_splits_rule_and_test_apart(capsys, tmp_path, linear_file):
    from difftune.trainables.data.splits import DEFAULT_HOLDOUT, holdout_positions

    rc, plan, err = plan_json(capsys, "--space", linear_file, *IMAGENET, "--cache-budget", "2TB",
                              "--cache", str(tmp_path / "none"))
    assert rc == 0, err
    d = plan["data"]
    assert d["train_images"] + d["val_images"] == IMAGES  # train/ holds train and val
    assert (d["train_images"], d["val_images"], d["test_images"]) == (TRAIN, VAL, TEST)
    assert d["holdout"] == DEFAULT_HOLDOUT
    # the splits' own holdout of one class of 1281 images
    fit, held = holdout_positions([0] * 1281, DEFAULT_HOLDOUT)
    assert (len(fit), len(held)) == (1281 - 128, 128)
    # test: the champion once, one pass per image at its own block; not in the search's
    assert plan["test"] == pytest.approx({"images": TEST, "evaluations": 1,
                                          "image_passes": TEST, "gpu_hours":
                                          TEST * plan["trial_gflops_per_image"]
                                          / plan["gflops_per_s"] / 3600})
    assert plan["unet_image_passes"] == 60 * (TRAIN + VAL)
    # the champion among each confirmed config: one evaluation each
    rc, confirm, _ = plan_json(capsys, "--space", linear_file, *IMAGENET, "--test-images", "1000",
                               "--set", "label_fraction=0.1", "--cache-budget", "2TB",
                               "--cache", str(tmp_path / "none"))
    assert rc == 0 and confirm["test"]["images"] == 1000 and confirm["test"]["evaluations"] == 1
    space = single(search_overrides={})
    space.search.update(confirm_top=3, confirm_label_fraction=1.0)
    plan3 = make_plan(space, data_size(space, images=IMAGES, classes=CLASSES,
                                       test_images=TEST))
    assert plan3.test["evaluations"] == 3 and plan3.test["image_passes"] == 3 * TEST
    rc, alias, _ = plan_json(capsys, "--space", linear_file, *IMAGENET, "--val-images", "7",
                             "--cache-budget", "2TB", "--cache", str(tmp_path / "none"))
    assert rc == 0 and alias["data"]["test_images"] == 7  # --val-images: ImageNet's val/


def test_plan_takes_a_search_command_line(capsys, tmp_path, linear_file):
    from difftune.search.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    flags = {s for a in subs["search"]._actions for s in a.option_strings}
    assert flags <= {s for a in subs["plan"]._actions for s in a.option_strings}
    search_argv = ["--space", linear_file, "--checkpoint", str(tmp_path / "x.pt"),
                   "--trials", "7", "--seed", "3", "--experiment", "e", "--model-name", "m",
                   "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                   "--artifact-location", str(tmp_path / "art"), "--address", "auto",
                   "--gpus-per-trial", "0.5", "--cpus-per-trial", "2", "--max-concurrent", "2",
                   "--storage", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
                   "--cache-budget", "2TB", "--data-hash", "content", "--set", "lr=0.01",
                   "--optuna-storage", f"sqlite:///{tmp_path}/optuna.db", "--top", "5"]
    capsys.readouterr()
    assert main(["plan", *search_argv, *IMAGENET]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan of space linear") and "7 trials x up to 28 epochs, 2 at once" in out
    assert "the trials hold 1 GPU(s) at once (2 x 0.5)" in out
    rc, plan, err = plan_json(capsys, *search_argv, *IMAGENET, "--no-cache")
    assert rc == 0, err
    assert plan["trials"] == 7 and plan["max_concurrent"] == 2 and plan["policy"] == "none"
    assert plan["unet_image_passes"] == plan["unet_image_passes_paper"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
