"""Search spaces: presets, validation against the model, --set pins, the define-by-run."""

from __future__ import annotations

import re

import optuna
import pytest

from difftune.search.space.spec import SpaceError, load_space, parse_set, preset_names
from difftune.trainables.config import TrialConfig
from difftune.trainables.params import decode as decode_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return str(p)


BASE = """
model: demo
data: digits
fixed: {epochs: 1}
params:
  block: {int: [1, 19]}
  t: {choice: [10, 90]}
  pool: {choice: [1, 2]}
  head: {choice: {linear: {}, mlp: {hidden: {choice: [[64], [64, 64]]}}}}
"""


def test_presets_found_by_name():
    assert {"demo", "linear"} <= set(preset_names())
    demo = load_space("demo")
    assert demo.num_blocks == 19 and demo.num_timesteps == 1000
    assert load_space("linear").num_blocks == 37


def test_define_by_run_gives_valid_trial_configs():
    space = load_space("demo")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    heads = set()
    for _ in range(30):
        trial = study.ask()
        const = space.define_by_run(trial)
        cfg = TrialConfig.from_dict(decode_config({**trial.params, **const}))
        assert 1 <= cfg.block <= 19 and 0 <= cfg.t <= 500 and cfg.pool in (1, 2, 4)
        # a head's sub-space is suggested only for that head
        assert all(k.startswith(f"{cfg.head}:") for k in trial.params if ":" in k)
        heads.add(cfg.head)
        study.tell(trial, 0.0)
    assert heads == {"linear", "mlp", "attention", "difformer", "diffeed"}


def test_paper_config_is_the_first_point_when_inside_the_space():
    space = load_space("demo")
    points = space.points_to_evaluate()
    assert points == [{"block": 10, "t": 90, "pool": 2, "lr": 0.01, "head": "linear"}]
    # pinning pool to 4 puts the paper's pool 2 outside the space: nothing is enqueued
    assert load_space("demo", overrides={"pool": 4}).points_to_evaluate() == []


def test_prior_paper_enqueues_startup_points_near_the_middle_at_t_50_to_300():
    space = load_space("linear", search_overrides={"seed": 3})  # paper256: 37 blocks, prior
    assert space.search["prior"] == "paper"
    paper, *startup = space.points_to_evaluate()
    assert paper["block"] == 24 and len(startup) == 6  # a tenth of its 60 trials
    for p in startup:
        assert set(p) == {"block", "t"} and 13 <= p["block"] <= 25 and 50 <= p["t"] <= 300
        assert p["t"] % 10 == 0
    assert len({p["block"] for p in startup}) == 6  # spread, not repeated
    assert load_space("linear", search_overrides={"seed": 3}).points_to_evaluate()[1:] == startup
    assert load_space("linear", search_overrides={"seed": 4}).points_to_evaluate()[1:] != startup
    assert len(load_space("demo").points_to_evaluate()) == 1  # prior: none, the paper's config


@pytest.mark.parametrize("setting, message", [
    ("metric: val_acc", "search.metric='val_acc' is invalid; allowed: one of val_top1, "
                        "val_top5, val_loss"),
    ("mode: maximize", "search.mode='maximize' is invalid; allowed: max or min"),
    ("prior: imagenet", "search.prior='imagenet' is invalid; allowed: none or paper"),
])
def test_bad_search_settings(tmp_path, setting, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"model: demo\nsearch: {{{setting}}}\n")
    with pytest.raises(SpaceError, match=re.escape(message)):
        load_space(str(path))


def test_mode_follows_the_metric_unless_given(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: demo\nparams:\n  block: {int: [1, 19]}\n")
    assert load_space(str(path), search_overrides={"metric": "val_loss"}).search["mode"] == "min"
    assert load_space(str(path), search_overrides={"metric": "val_top5"}).search["mode"] == "max"
    assert load_space(str(path), search_overrides={"metric": "val_loss", "mode": "max"}
                      ).search["mode"] == "max"


def test_set_pins_a_parameter_and_keeps_the_head_subspace():
    space = load_space("demo", overrides=parse_set(["head=mlp", "epochs=3", "block=12"]))
    assert space.fixed["epochs"] == 3 and space.fixed["block"] == 12
    assert "block" not in space.params
    assert list(space.params["head"]["choice"]) == ["mlp"]
    trial = optuna.create_study().ask()
    const = space.define_by_run(trial)
    cfg = decode_config({**trial.params, **const})
    assert cfg["head"] == "mlp" and "hidden" in cfg and cfg["block"] == 12


def test_subset_parameters_are_never_empty(tmp_path):
    path = write(tmp_path, """
model: demo
params:
  head: {choice: [difformer]}
  blocks: {subset: [10, 13, 16]}
""")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        const = space.define_by_run(trial)
        cfg = decode_config({**trial.params, **const})
        assert cfg["blocks"] and set(cfg["blocks"]) <= {10, 13, 16}
        seen.add(tuple(cfg["blocks"]))
        study.tell(trial, 0.0)
    assert len(seen) > 2


@pytest.mark.parametrize("text, needle", [
    (BASE + "bogus: 1\n", "unknown key(s) ['bogus']"),
    (BASE.replace("int: [1, 19]", "int: [0, 19]"), "block 0 is out of range; model demo has blocks 1..19"),
    (BASE.replace("int: [1, 19]", "int: [1, 20]"), "block 20 is out of range"),
    (BASE.replace("[10, 90]", "[10, 1000]"), "timestep 1000 is out of range; allowed 0..999"),
    (BASE.replace("pool: {choice: [1, 2]}", "pool: {choice: [0, 2]}"), "pool=0 is invalid"),
    (BASE.replace("[10, 90]", "[]"), "params.t.choice is empty"),
    (BASE.replace("linear: {}", "svm: {}"), "unknown head type(s) ['svm']"),
    (BASE.replace("fixed: {epochs: 1}", "fixed: {epoch: 1}"), "fixed.epoch is not a trial setting"),
    ("model: demo\nparams: {block: [1, 2}\n", "is not valid YAML"),
    ("model: demo\nparams:\n  head: {choice: [difformer]}\n  blocks: {subset: [10, 20]}\n",
     "block 20 is out of range"),
    ("model: demo\nfixed: {head: diffeed, feedback_blocks: [4, 12]}\n",
     "block 4 is out of range; model demo has blocks 11..19 (decoder blocks)"),
])
def test_bad_space_is_one_clear_error(tmp_path, text, needle):
    with pytest.raises(SpaceError) as exc:
        load_space(write(tmp_path, text))
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_set_of_unknown_name_is_an_error():
    with pytest.raises(SpaceError, match="has no setting 'bogus'"):
        load_space("demo", overrides={"bogus": 1})
    with pytest.raises(SpaceError, match="must look like NAME=VALUE"):
        parse_set(["head"])


def test_model_override_revalidates_blocks():
    # the linear preset searches blocks up to 37: on the 19-block demo model that is an error
    with pytest.raises(SpaceError, match="block 37 is out of range; model demo has blocks 1..19"):
        load_space("linear", model="demo")


@pytest.mark.parametrize("preset", ["demo", "linear", "attention", "difformer", "diffeed"])
def test_each_preset_enqueues_the_papers_config_exactly(preset):
    """The enqueued point, replayed through the define-by-run, gives the paper's config."""
    space = load_space(preset)
    point = space.points_to_evaluate()[0]  # then, with prior: paper, the startup points
    study = optuna.create_study()
    study.enqueue_trial(point)
    trial = study.ask()
    const = space.define_by_run(trial)
    assert set(trial.params) == set(point)  # every suggested name was given by the point
    cfg = decode_config({**trial.params, **const})
    for key, value in space.paper_config.items():
        assert cfg[key] == value, key
    TrialConfig.from_dict(cfg)


def test_block_set_covers_ranges_subsets_and_head_subspaces():
    assert load_space("demo").block_set() == tuple(range(1, 20))  # the whole int range
    assert load_space("difformer").block_set() == (15, 19, 24, 27, 30, 33)
    # DifFeed: the feedback blocks and the head's block choices
    assert load_space("diffeed").block_set() == (19, 21, 24, 27, 30, 33, 36)


def test_subset_min_is_honoured_and_the_point_replays(tmp_path):
    """``{subset: [...], min: 2}``: every suggested subset has at least 2 members, every
    size from 2 up is reached, and a config's point replays to that config."""
    path = write(tmp_path, """
model: demo
params:
  head: {choice: [difformer]}
  blocks: {subset: [7, 10, 13, 16], min: 2}
""")
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    sizes = set()
    for _ in range(80):
        trial = study.ask()
        const = space.define_by_run(trial)
        cfg = decode_config({**trial.params, **const})
        assert len(cfg["blocks"]) >= 2 and set(cfg["blocks"]) <= {7, 10, 13, 16}, cfg
        sizes.add(len(cfg["blocks"]))
        study.tell(trial, 0.0)
    assert sizes == {2, 3, 4}
    for blocks in ([7, 10], [13, 16], [7, 16], [10, 13, 16]):
        point = space.point({"head": "difformer", "blocks": blocks})
        replay = optuna.create_study()
        replay.enqueue_trial(point)
        trial = replay.ask()
        const = space.define_by_run(trial)
        cfg = decode_config({**trial.params, **const})
        assert cfg["blocks"] == blocks and set(trial.params) == set(point)
    assert space.point({"head": "difformer", "blocks": [7]}) is None  # below min: outside


def test_default_experiment_comes_from_the_space_and_the_data(tmp_path):
    from difftune.search.records.tracking import default_experiment

    assert default_experiment(load_space("demo")) == "difftune-demo"
    flowers = tmp_path / "Oxford Flowers"
    for split in ("train", "val"):
        (flowers / split / "rose").mkdir(parents=True)
    assert default_experiment(load_space("demo", data=str(flowers) + "/")) == \
        "difftune-demo-Oxford-Flowers"
    other = load_space(write(tmp_path, BASE), model="paper256")
    assert default_experiment(other) == "difftune-space-digits-paper256"  # not its own model
