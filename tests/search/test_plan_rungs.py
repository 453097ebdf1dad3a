"""The plan under rungs over images (``search: image_rungs``): trials per rung by ASHA's
reduction factor, each split's sample by the interleaved order's ``sample_size`` (checked
against the real digits splits), passes that extend entries and never exceed the
single-fidelity search's, one rung ``[1.0]`` equal to it, the probe rung, and the rung
table ``difftune plan`` prints (spaces/linear.yaml on ImageNet-1k: at most 100 GPU-hours,
at least 50x fewer than the paper's way)."""

from __future__ import annotations

import json

import pytest

from difftune.search.cli import main
from difftune.search.plan.arithmetic import model_flags
from difftune.search.plan.data import DataSize
from difftune.search.plan.estimate import data_size, make_plan
from difftune.search.plan.rungs import Rungs, rungs_of, running_rows
from difftune.search.space.spec import Space, load_space
from difftune.trainables.data.order import sample_size
from difftune.trainables.model.cost import unet_costs

IMAGES, CLASSES = 1_281_167, 1000
IMAGENET = ["--images", str(IMAGES), "--classes", str(CLASSES)]
VAL = 128 * CLASSES
TRAIN = IMAGES - VAL
RUNGS = [0.02, 0.1, 0.5, 1.0]


def space_with(name: str = "linear", rungs=RUNGS, **search) -> Space:
    space = load_space(name)
    space.search.update(image_rungs=rungs, **search)
    return space


@pytest.fixture(scope="module")
def imagenet() -> DataSize:
    return data_size(load_space("linear"), images=IMAGES, classes=CLASSES)


@pytest.fixture(scope="module")
def linear(imagenet):
    """The preset's plan on ImageNet-1k (its rungs), no budget."""
    return make_plan(load_space("linear"), imagenet)


def test_the_linear_preset_has_rungs_and_comes_under_100_gpu_hours(linear):
    r = linear.rungs
    assert r is not None and r["fractions"] == RUNGS
    ours = linear.gpu_hours + linear.head_gpu_hours
    paper = linear.gpu_hours_paper + linear.head_gpu_hours_paper
    assert ours <= 100 and paper / ours >= 50
    # the totals are the rows' sums (no probe, no confirm in the preset)
    assert sum(row["image_passes"] for row in r["rows"]) == pytest.approx(
        linear.unet_image_passes, abs=len(r["rows"]))  # each rounded to a whole pass
    assert sum(row["gpu_hours"] for row in r["rows"]) == pytest.approx(linear.gpu_hours)
    assert sum(row["head_gpu_hours"] for row in r["rows"]) == pytest.approx(
        linear.head_gpu_hours)
    assert r["single"]["gpu_hours"] > 5 * linear.gpu_hours


def test_trials_per_rung_follow_the_reduction_factor(imagenet):
    for rf, trials in ((3, 60), (2, 60), (3, 4)):
        space = space_with(reduction_factor=rf, trials=trials)
        plan = make_plan(space, imagenet)
        got = [row["trials"] for row in plan.rungs["rows"]]
        # in expectation trials / rf**k reach rung k, and at least one (the first trial at
        # a rung always goes on)
        want = [min(trials, max(1.0, trials / rf ** k)) for k in range(4)]
        assert got == pytest.approx(want)
        assert plan.rungs["max_t"] == rf ** 3
    assert [row["trials"] for row in make_plan(space_with(trials=4), imagenet).rungs["rows"]] \
        == pytest.approx([4, 4 / 3, 1, 1])


def test_rung_samples_are_the_interleaved_orders_sample_size(imagenet):
    rungs = rungs_of(space_with(), imagenet)
    per_class = [IMAGES // CLASSES + (i < IMAGES % CLASSES) for i in range(CLASSES)]
    val = [128] * CLASSES  # the splits' 0.1 holdout of each class of 1281 or 1282
    train = [n - 128 for n in per_class]
    assert rungs.train == tuple(sample_size(train, f, 5) for f in RUNGS)
    assert rungs.val == tuple(sample_size(val, f, 5) for f in RUNGS)
    assert rungs.train[-1] == TRAIN and rungs.val[-1] == VAL
    assert rungs.val[0] == 5 * CLASSES > 0.02 * VAL  # the floor: 5 per class, not 2.56
    # a label fraction samples the subset it keeps (round(0.1 n) per class)
    tenth = rungs_of(space_with(), imagenet, label_fraction=0.1)
    assert tenth.train == tuple(sample_size([round(0.1 * n) for n in train], f, 5)
                                for f in RUNGS)
    # a higher floor
    ten = rungs_of(space_with(image_floor=10), imagenet)
    assert ten.val[0] == 10 * CLASSES and ten.train[0] >= rungs.train[0]


def test_rung_samples_on_digits_are_what_the_splits_hold():
    """On the digits data, each rung's rows are ``rung_rows`` of the real split's labels."""
    from difftune.trainables.data.datasets import load_dataset
    from difftune.trainables.data.order import rung_rows
    from difftune.trainables.data.splits import targets_of

    space = load_space("demo")
    space.search.update(image_rungs=[0.05, 0.3, 1.0], image_floor=3)
    rungs = rungs_of(space, data_size(space))
    for split, rows in (("train", rungs.train), ("val", rungs.val)):
        ds, _ = load_dataset("digits", split=split, image_size=8)
        assert rows == tuple(rung_rows(targets_of(ds), f, 3) for f in (0.05, 0.3, 1.0))
        assert rows[-1] == len(ds)


@pytest.mark.parametrize("name, overrides, policy", [
    ("linear", {}, None), ("linear", {}, "block-set"), ("linear", {"t": 90}, None),
    ("attention", {}, None), ("difformer", {}, None),
])
def test_rung_passes_never_exceed_the_single_fidelity_searchs(imagenet, name, overrides,
                                                               policy):
    space = load_space(name, overrides=overrides)
    space.search.update(image_rungs=RUNGS)
    if policy:
        space.search["cache_policy"] = policy
    plan = make_plan(space, imagenet)
    single = plan.rungs["single"]
    assert plan.unet_image_passes <= single["image_passes"]
    assert plan.gpu_hours <= single["gpu_hours"] * (1 + 1e-9)
    assert plan.cache_bytes_bound <= single["cache_bytes"]
    assert plan.head_gpu_hours < plan.head_gpu_hours_paper  # rung 0 is cheap to train on
    for row in plan.rungs["rows"]:  # each rung pays for its extension only
        assert 0 < row["image_passes"] <= row["trials"] * (row["train_rows"] + row["val_rows"]) \
            * max(1, len(plan.timesteps)) + 1


def test_one_rung_is_the_single_fidelity_search(imagenet):
    for overrides, policy in (({}, None), ({}, "block-set"), ({"t": 90}, None)):
        plans = []
        for rungs in (None, [1.0]):
            space = load_space("linear", overrides=overrides)
            space.search.update(image_rungs=rungs, **({"cache_policy": policy} if policy
                                                       else {}))
            plans.append(make_plan(space, imagenet, budget=2 * 10**12))
        flat, one = plans
        assert one.rungs is not None and flat.rungs is None
        assert one.policy == flat.policy
        assert one.unet_image_passes == flat.unet_image_passes
        assert one.gpu_hours == pytest.approx(flat.gpu_hours)
        assert one.cache_bytes_bound == flat.cache_bytes_bound
        assert one.working_set_bytes == flat.working_set_bytes
        assert one.rungs["rows"][0]["trials"] == 60
        # one rung runs every epoch; the single-fidelity search's epochs are ASHA's
        assert one.head_gpu_hours == pytest.approx(
            flat.head_gpu_hours * 28 / flat.expected_epochs)


def test_passes_by_hand_per_request_and_block_set(imagenet):
    """Per-request: every trial reaching rung k extends its entry by rung k's new rows;
    block-set at one timestep: the entry extends to the last rung once, one pass per image."""
    space = space_with()
    plan = make_plan(space, imagenet)
    r = rungs_of(space, imagenet)
    rows = r.rows()
    new = [rows[0]] + [b - a for a, b in zip(rows, rows[1:], strict=False)]
    want = sum(m * d for m, d in zip(r.trials(60), new, strict=True))
    assert plan.policy == "per-request" and plan.unet_image_passes == round(want)
    one_t = load_space("linear", overrides={"t": 90})
    one_t.search.update(image_rungs=RUNGS)
    bs = make_plan(one_t, imagenet)
    assert bs.policy == "block-set" and bs.unet_image_passes == TRAIN + VAL
    assert [row["image_passes"] for row in bs.rungs["rows"]] == new


def test_the_working_set_counts_trials_at_the_rung_they_reach():
    r = Rungs(fractions=(0.1, 1.0), floor=5, reduction_factor=3, train=(90, 900),
              val=(10, 100), reach=(1.0, 1 / 3))
    # 10 trials: 4 (ceil 3.33) reach the last rung with 1000 rows, the rest stop at 100
    assert running_rows(r, 10, 8, 1000) == 4 * 1000 + 4 * 100
    assert running_rows(r, 10, 3, 1000) == 3 * 1000
    assert running_rows(None, 10, 8, 1000) == 8 * 1000


def test_the_probe_rung_passes_rung_0_once_per_timestep_to_the_deepest_block(imagenet):
    """... and stores it: the trials' rung 0 reads the probe's entries (search/run/probe.py
    reads them through the cache's prefix entries), so its passes replace theirs."""
    plain = make_plan(space_with(), imagenet)
    probed = make_plan(space_with(probe_rung=True), imagenet)
    p = probed.rungs["probe"]
    r = probed.rungs
    assert p["image_passes"] == 51 * (r["train_rows"][0] + r["val_rows"][0])
    gflops = unet_costs(model_flags(load_space("linear")))[37].gflops_to
    assert p["gpu_hours"] == pytest.approx(p["image_passes"] * gflops / probed.gflops_per_s
                                           / 3600)
    rung0 = plain.rungs["rows"][0]
    assert probed.rungs["rows"][0]["image_passes"] == 0  # served by the probe's entries
    assert probed.unet_image_passes == \
        plain.unet_image_passes - rung0["image_passes"] + p["image_passes"]
    assert probed.gpu_hours == pytest.approx(
        plain.gpu_hours - rung0["gpu_hours"] + p["gpu_hours"])
    # its entries: every timestep x every block of the space at the store pool, rung 0's rows
    assert p["cache_bytes"] >= probed.rungs["rows"][0]["cache_bytes"] > 0
    assert probed.cache_bytes_bound >= plain.cache_bytes_bound
    assert plain.rungs["probe"] is None


def test_the_cli_prints_the_rung_table(capsys, tmp_path):
    capsys.readouterr()
    argv = ["plan", "--space", "linear", *IMAGENET, "--cache-budget", "2TB",
            "--cache", str(tmp_path / "none")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "image rungs 0.02, 0.1, 0.5, 1 (at least 5 images per class" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["rung", "fraction",
                                                                          "trials"])
    table = [line.split() for line in lines[header + 1:header + 6]]
    assert [row[0] for row in table] == ["0", "1", "2", "3", "total"]
    assert [row[2] for row in table[:4]] == ["60", "20", "6.67", "2.22"]
    assert table[0][3] == "23,064" and table[3][3] == f"{TRAIN:,}"
    assert "without rungs:" in out and "the paper's way:" in out
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [row["train_rows"] for row in plan["rungs"]["rows"]] == plan["rungs"]["train_rows"]
    assert plan["gpu_hours"] + plan["head_gpu_hours"] <= 100
    assert not (tmp_path / "none").exists()


def test_no_cache_under_rungs_is_the_papers_way_on_the_rungs(capsys, tmp_path):
    capsys.readouterr()
    assert main(["plan", "--space", "linear", *IMAGENET, "--no-cache", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["policy"] == "none"
    assert plan["unet_image_passes"] == plan["rungs"]["paper_rungs"]["image_passes"]
    assert plan["unet_image_passes"] < plan["unet_image_passes_paper"]


def test_bad_rungs_are_one_line(capsys, tmp_path):
    (tmp_path / "s.yaml").write_text("model: demo\nsearch: {image_rungs: [0.5, 0.2]}\n")
    capsys.readouterr()
    assert main(["plan", "--space", str(tmp_path / "s.yaml"), "--cache-budget", "1GB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_rungs" in err[0], err


def test_a_live_head_reruns_the_unet_every_epoch_of_each_rung(imagenet):
    """DifFeed caches nothing: under rungs its trials run every epoch at each rung they
    reach on that rung's sample, as the paper's way on the same rungs does; with 16 trials
    and reduction 3 that is fewer passes than the epochs ASHA leaves it without rungs."""
    plan = make_plan(load_space("diffeed"), imagenet)
    r = plan.rungs
    assert plan.policy == "none" and r is not None
    assert plan.unet_image_passes == pytest.approx(r["paper_rungs"]["image_passes"], abs=2)
    by_hand = sum(m * 28 * (t + v) for m, t, v in zip(
        [row["trials"] for row in r["rows"]], r["train_rows"], r["val_rows"], strict=True))
    assert plan.unet_image_passes == pytest.approx(2 * by_hand)  # feedback + second pass
    assert plan.unet_image_passes < r["single"]["image_passes"]
