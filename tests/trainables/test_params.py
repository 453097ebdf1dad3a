"""The flat parameter names of a trial, both ways (trainables.params), and the Optuna side
that spells its parameters with them (search.space_optuna)."""

from __future__ import annotations

import pytest

from difftune.search.space import distributions as space_optuna
from difftune.trainables.errors import ConfigError
from difftune.trainables.params import (
    decode,
    encode_choice,
    head_param,
    subset_param,
    trial_config,
)

PARAMS = {
    "lr": {"float": [0.001, 0.1], "log": True},
    "head": {"choice": {
        "mlp": {"hidden": {"choice": [[128], [256, 256]]}, "block": {"choice": [7, 13]}},
        "difformer": {"blocks": {"subset": [7, 10, 13]}, "timesteps": {"subset": [10, 90]}},
    }},
    "block": {"int": [1, 19]},
}


def test_names_are_spelled_in_one_place():
    assert head_param("mlp", "hidden") == "mlp:hidden"
    assert subset_param("blocks", 19) == "blocks@19"
    assert encode_choice([256, 256]) == "[256, 256]" and encode_choice(7) == 7


@pytest.mark.parametrize("config", [
    {"head": "mlp", "hidden": [256, 256], "block": 13, "lr": 0.01},
    {"head": "difformer", "blocks": [7, 13], "timesteps": [90], "lr": 0.05},
    {"head": "difformer", "blocks": [13], "timesteps": [10, 90], "lr": 0.002},
])
def test_a_config_enqueued_in_optuna_comes_back_as_itself(config):
    """The path of the paper's config: encoded as a point, enqueued, suggested again by the
    define-by-run function (which adds what it does not suggest), decoded."""
    import optuna

    point = space_optuna.point(PARAMS, {}, config)
    assert point is not None
    assert all("/" not in k for k in point)  # Ray Tune splits names on "/"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(point)
    trial = study.ask()
    const = space_optuna.suggest(trial, PARAMS, {})
    decoded = decode({**trial.params, **const})
    assert {k: decoded[k] for k in config} == config


def test_a_head_is_searched_only_over_the_settings_it_reads():
    """DifFormer reads neither block, t nor pool; a linear head no pre_pool: TPE never gets
    those dimensions for such trials (and a config without them is inside the space)."""
    import optuna

    params = {"head": {"choice": {"linear": {}, "difformer": {"blocks": {"subset": [7, 10]}}}},
              "block": {"int": [1, 19]}, "t": {"int": [0, 500], "step": 10},
              "pool": {"choice": [1, 2]}, "pre_pool": {"choice": [2, 4]},
              "lr": {"float": [0.001, 0.1], "log": True}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        space_optuna.suggest(trial, params, {})
        seen.setdefault(trial.params["head"], set()).update(trial.params)
        study.tell(trial, 0.0)
    assert seen["difformer"] == {"head", "difformer:blocks@7", "difformer:blocks@10",
                                 "pre_pool", "lr"}
    assert seen["linear"] == {"head", "block", "t", "pool", "lr"}
    assert space_optuna.point(params, {}, {"head": "difformer", "blocks": [7, 10],
                                           "pre_pool": 2, "lr": 0.01}) is not None


def test_a_heads_own_setting_wins_over_the_top_level_one():
    assert decode({"block": 4, "mlp:block": 13, "head": "mlp"})["block"] == 13


def test_outside_the_space_is_none():
    assert space_optuna.point(PARAMS, {}, {"head": "linear", "block": 3, "lr": 0.01}) is None
    assert space_optuna.point(PARAMS, {}, {"head": "mlp", "hidden": [64], "block": 13,
                                           "lr": 0.01}) is None
    assert space_optuna.point(PARAMS, {"epochs": 4}, {"head": "mlp", "hidden": [128],
                                                      "block": 7, "lr": 0.01,
                                                      "epochs": 5}) is None


def test_trial_config_refuses_unknown_settings():
    cfg = trial_config({"head": "mlp", "mlp:hidden": "[64]", "block": 3})
    assert cfg.hidden == [64] and cfg.block == 3
    with pytest.raises(ConfigError, match="unknown trial setting"):
        trial_config({"blokc": 3})
