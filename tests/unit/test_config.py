"""amft_lib.config (mirror test): the one field helper, the one method registry and the help texts made from
it, overrides that re-validate, and the config hash that checkpoints and lineage carry."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from amft_lib.config import (
    BASELINES,
    METHOD_HELP,
    METHODS,
    ConfigError,
    ControllerConfig,
    Method,
    TrainConfig,
    apply_overrides,
    check_fields,
    config_from_dict,
    config_hash,
    config_to_dict,
    describe,
    help_field,
)


@dataclasses.dataclass
class _Knobs:
    name: str = help_field("Required: no default.")
    rate: float = help_field("A rate in [0, 1].", 0.5, ge=0, le=1)
    table: dict = help_field("Nested defaults.", {"a": [1, 2]})


def test_help_field_copies_list_and_dict_defaults_per_instance_deeply():
    one, two = _Knobs(name="x"), _Knobs(name="y")
    one.table["a"].append(3)
    assert two.table == {"a": [1, 2]}  # nested lists are not shared between configs either


def test_help_field_carries_help_and_range_and_can_be_required():
    fields = {f.name: f for f in dataclasses.fields(_Knobs)}
    assert fields["rate"].metadata == {"help": "A rate in [0, 1].", "range": {"ge": 0, "le": 1}}
    with pytest.raises(TypeError, match="name"):
        _Knobs()  # no default: required
    with pytest.raises(ConfigError, match=r"rate=1\.5: must be >= 0 and <= 1 \(default 0\.5\)"):
        check_fields(_Knobs(rate=1.5, name="x"))
    with pytest.raises(ConfigError, match=r"rate=nan: must be a finite number"):
        check_fields(_Knobs(rate=float("nan"), name="x"))


def test_the_method_registry_is_the_one_list_of_methods():
    assert METHODS == tuple(METHOD_HELP) == get_args(Method)
    assert set(BASELINES) == set(METHODS) - {"amft"} and len(METHODS) == 10


def test_every_help_text_that_lists_methods_names_all_of_them():
    """They named 7 of the 9 before the registry (chord and hpt were missing)."""
    import argparse

    from amft_lib.cli import train as train_cli
    from amft_lib.run.settings import SETTINGS

    method_help = {f.name: f for f in dataclasses.fields(ControllerConfig)}["method"].metadata["help"]
    pipeline_help = SETTINGS["p4_train_method"].help
    sub = argparse.ArgumentParser().add_subparsers()
    train_cli.register(sub)
    description = sub.choices["train"].description
    for method in METHODS:
        assert f"{method} (" in method_help
        assert method in description.lower() and method in pipeline_help


def test_overrides_are_parsed_as_yaml_and_revalidated():
    cfg = apply_overrides(TrainConfig(), ["controller.eta_mu=0.1", "rollout.group_size=4"])
    assert cfg.controller.eta_mu == 0.1 and cfg.rollout.group_size == 4
    with pytest.raises(ConfigError, match=r"unknown key 'controller\.eta'"):
        apply_overrides(TrainConfig(), ["controller.eta=0.1"])
    with pytest.raises(ConfigError, match="mu_init"):
        apply_overrides(TrainConfig(), ["controller.mu_init=2"])  # outside [0, 1]: refused on re-validation


def test_unknown_keys_are_refused_on_load():
    data = config_to_dict(TrainConfig())
    data["controller"]["typo_knob"] = 1
    with pytest.raises(ConfigError, match="typo_knob"):
        config_from_dict(data, TrainConfig)


def test_config_hash_follows_what_is_trained_not_how_it_is_launched():
    base = TrainConfig()
    assert config_hash(base) == config_hash(config_from_dict(config_to_dict(base), TrainConfig))
    assert config_hash(apply_overrides(base, ["seed=1"])) != config_hash(base)
    assert config_hash(apply_overrides(base, ["distributed.strategy=ddp"])) == config_hash(base)


def test_a_knob_added_later_keeps_older_hashes_while_at_its_default():
    """controller.meta_accumulate arrived after runs had written hashes; a config written before it (no key)
    must hash like today's default, or a half-finished run is refused on resume after an upgrade."""
    base = apply_overrides(TrainConfig(), ["controller.meta_update=evidence", "controller.meta_estimator=jvp"])
    older = config_to_dict(base)
    del older["controller"]["meta_accumulate"]
    today = config_to_dict(base)
    assert config_hash(older) == config_hash(base) == config_hash(today)
    assert today["controller"]["meta_accumulate"] == 1  # the dict passed in is not mutated
    pooled = apply_overrides(base, ["controller.meta_accumulate=4"])
    assert config_hash(pooled) != config_hash(base)
    assert config_hash(config_to_dict(pooled)) == config_hash(pooled)


def test_describe_lists_every_leaf_key_with_its_help():
    rows = {key: (default, text) for key, default, text in describe()}
    assert rows["controller.method"][0] == "'amft'"
    assert rows["optim.lr"][1] and all(text for _, text in rows.values())
