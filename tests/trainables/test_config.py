"""TrialConfig (trainables.config): the paper's defaults, what YAML/Optuna hand it, and the
errors for unknown keys and values of the wrong kind."""

from __future__ import annotations

import pytest
import yaml

from difftune.trainables.config import ConfigError, TrialConfig
from difftune.trainables.errors import UserError
from difftune.trainables.heads import checked_config
from difftune.trainables.trial import resolve


def test_defaults_are_the_papers_recipe():
    cfg = TrialConfig()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-2, 0.0, 0.0)
    assert (cfg.step_size, cfg.gamma, cfg.epochs) == (7, 0.1, 28)
    assert cfg.head == "linear" and cfg.model == "demo" and cfg.data == "digits"
    assert TrialConfig.from_dict({}) == cfg


def test_round_trip_through_dict_and_yaml():
    cfg = TrialConfig.from_dict(dict(head="mlp", hidden=[128, 64], block=19, t=150, pool=4,
                                     optimizer="adamw", lr=3e-4, label_fraction=0.1))
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert TrialConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    # the default lists are not shared between instances
    a, b = TrialConfig(), TrialConfig()
    a.hidden.append(1)
    assert b.hidden == [256]


def test_accepts_what_yaml_and_optuna_produce():
    cfg = TrialConfig.from_dict({
        "block": 19.0,  # Optuna / JSON ints as floats
        "epochs": 3,
        "lr": "1e-3",  # PyYAML reads 1e-3 (no dot) as a string
        "momentum": 0,  # an int where a float is expected
        "hidden": (64, 32),  # tuples as lists
        "blocks": 24,  # a single block where a list is expected
        "label_fraction": "0.01",
    })
    assert cfg.block == 19 and isinstance(cfg.block, int)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.momentum == 0.0 and isinstance(cfg.momentum, float)
    assert cfg.hidden == [64, 32] and cfg.blocks == [24]
    assert cfg.label_fraction == 0.01
    assert TrialConfig.from_dict({"label_fraction": "subsets/1percent.txt"}).label_fraction == (
        "subsets/1percent.txt")
    assert TrialConfig.from_dict({"checkpoint": None}).checkpoint is None


def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({"blok": 19, "lr": 0.1, "optimiser": "sgd"})
    msg = str(info.value)
    assert "blok" in msg and "optimiser" in msg
    assert "block" in msg and "optimizer" in msg  # what is allowed
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "key, value",
    [
        ("block", "nineteen"),
        ("block", 19.5),  # not an integer
        ("block", True),  # a bool is not a block number
        ("epochs", [3]),
        ("lr", "fast"),
        ("lr", [0.1]),
        ("hidden", "256"),  # a string is not a list of widths
        ("hidden", [64.5]),
        ("blocks", {"19": 1}),
        ("blocks", ["x"]),
        ("head", ["linear"]),
        ("model", {"name": "demo"}),
        ("optimizer", 3),
    ],
)
def test_wrong_types_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        TrialConfig.from_dict({key: value})


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("head", "transformer", ["linear", "mlp"]),
        ("optimizer", "adam", ["sgd", "adamw"]),
        ("pool", 0, ["pool"]),
        ("epochs", -1, ["epochs"]),
        ("batch_size", 0, ["batch_size"]),
        ("lr", 0, ["lr"]),
        ("lr", -1e-3, ["lr"]),
        ("lr", float("inf"), ["lr=inf is invalid; allowed: a number > 0"]),
        ("momentum", 1.5, ["momentum=1.5 is invalid; allowed: a number in [0, 1]"]),
        ("weight_decay", -0.1, ["weight_decay=-0.1 is invalid; allowed: a number >= 0"]),
        ("gamma", 0, ["gamma=0.0 is invalid; allowed: a number > 0"]),
        ("dropout", 1.0, ["dropout=1.0 is invalid; allowed: a number in [0, 1)"]),
        ("noise_seed", -1, ["noise_seed=-1 is invalid; allowed: an integer >= 0"]),
        ("timesteps", [90, -1], ["timesteps=[90, -1] is invalid; allowed: an integer >= 0"]),
        ("label_fraction", 0, ["label_fraction=0.0 is invalid; allowed: a number in (0, 1]"]),
    ],
)
def test_invalid_values_name_what_is_allowed(key, value, words):
    with pytest.raises(ConfigError) as info:
        checked_config({key: value})  # the config's checks, then the head kind's
    for word in words:
        assert word in str(info.value)


def test_the_config_knows_no_head_its_kind_checks_its_settings():
    # TrialConfig is a leaf: the head's name and settings are checked by the head kind
    assert TrialConfig.from_dict({"head": "mlp", "hidden": []}).hidden == []
    with pytest.raises(ConfigError, match="hidden"):
        checked_config({"head": "mlp", "hidden": []})
    with pytest.raises(ConfigError, match="dim=100 must be a positive multiple of heads=8"):
        resolve({"head": "attention", "dim": 100, "heads": 8})
