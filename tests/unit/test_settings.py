"""The settings table is the one source of truth for the pipeline's parameters: the explicit KFP
signature, preflight's inputs, the compiled descriptions and `amft pipeline params` agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from amft_lib.config import ConfigError, TrainConfig, WarmStartConfig
from amft_lib.run import settings
from components.preflight import preflight
from pipelines import amft_pipeline as dag
from pipelines.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[2]
KFP_TYPES = {str: "String", int: "Integer", float: "Float", bool: "Boolean", list: "List", dict: "Dict"}


def test_pipeline_signature_equals_the_table():
    """Names, order, types and defaults of `amft_pipeline`'s signature are the table's."""
    component_inputs = dag.amft_pipeline.component_spec.inputs
    assert list(component_inputs) == list(settings.SETTINGS)
    for name, spec in component_inputs.items():
        setting = settings.SETTINGS[name]
        assert spec.default == setting.default, f"{name}: signature default {spec.default!r} != table"
        assert spec.type == KFP_TYPES[setting.type], f"{name}: signature type {spec.type} != table"


def test_config_defaults_have_one_source():
    """A FROM_CONFIG setting's default is the config dataclass's (mu_init had four defaults once)."""
    assert settings.SETTINGS["p4_train_mu_init"].default == TrainConfig().controller.mu_init
    assert settings.SETTINGS["p3_warm_start_warmup_steps"].default == WarmStartConfig().warmup_steps
    ws, tr = settings.build_configs({})
    for name, setting in settings.SETTINGS.items():
        for stage, key in setting.keys.items():
            if key == settings.OVERRIDES:
                continue
            value = ws if stage == settings.WARM_START else tr
            for part in key.split("."):
                value = getattr(value, part)
            assert value == setting.default, f"{name} → {stage}.{key}"


def test_preflight_takes_exactly_the_settings_it_needs():
    """Every config-bearing setting reaches preflight under its own name (the DAG forwards them by
    name), plus the run-level ones preflight checks; nothing else."""
    inputs = set(preflight.component_spec.inputs) - {"job_id"}
    run_level = {"p0_run_id", "p0_s3_root", "p0_s3_endpoint_url", "p0_gpu_memory_gib", "p1_data_input_uri",
                 "p0_gpu_count", "p0_gpu_cpu_request", "p0_gpu_memory_request", "p0_trainjob_timeout_h",
                 "p6_registry_tracking_uri", "p4_train_num_nodes", "p4_train_nproc_per_node",
                 "p3_warm_start_num_nodes", "p3_warm_start_nproc_per_node"}
    assert inputs == set(settings.config_settings()) | run_level
    for name in inputs:
        assert preflight.component_spec.inputs[name].type == KFP_TYPES[settings.SETTINGS[name].type], name


def test_build_configs_order_named_then_model_settings_then_overrides():
    ws, tr = settings.build_configs({
        "p4_train_max_steps": 7, "p3_model_settings": ["engine.precision=bf16-mixed", "model.tiny_layers=1"],
        "p4_train_overrides": ["max_steps=11", "engine.precision=fp32"], "p3_model_max_new_tokens": 33,
        "p4_train_seed": 5})
    assert tr.max_steps == 11 and tr.model.tiny_layers == 1 and ws.model.tiny_layers == 1
    assert tr.engine.precision == "fp32" and ws.engine.precision == "bf16-mixed"  # the stage's own overrides come last
    assert ws.max_new_tokens == 33 and tr.rollout.max_new_tokens == 33 and ws.seed == tr.seed == 5
    with pytest.raises(ConfigError, match="train config"):
        settings.build_configs({"p4_train_mu_init": 2.0})


def test_every_root_parameter_of_the_compiled_yaml_has_a_description():
    spec = next(yaml.safe_load_all((ROOT / "pipelines" / "amft_pipeline.yaml").read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(settings.SETTINGS)
    missing = [name for name, p in params.items() if not (p.get("description") or "").strip()]
    assert not missing, f"parameters without a description: {missing}"
    assert params["p4_train_mu_init"]["description"].startswith("[AMFT training]")


def test_profiles_name_only_pipeline_parameters():
    for name, profile in PROFILES.items():
        unknown = set(profile) - set(settings.SETTINGS)
        assert not unknown, f"profile {name}: {unknown}"
        settings.build_configs({k: v for k, v in profile.items() if settings.SETTINGS[k].keys})


def test_amft_pipeline_params_prints_descriptions_and_local_values(capsys):
    from amft_lib import cli

    assert cli.main(["pipeline", "params"]) == 0
    out = capsys.readouterr().out
    assert 'p1_data_task (String) = "general_points"  [local: "countdown"]\n    Task: ' in out
    assert out.count("\n    ") == len(settings.SETTINGS)


def test_signature_is_explicit_for_kfp():
    """kfp reads real annotations and literal defaults: the signature is not generated."""
    source = inspect.getsource(dag.build_pipeline)
    for name in settings.SETTINGS:
        assert f"        {name}: " in source, name


def test_the_warm_start_measures_h_star_at_the_training_rollout_temperature():
    ws, tr = settings.build_configs({"p4_train_overrides": ["rollout.temperature=2.0"]})
    assert ws.entropy_temperature == tr.rollout.temperature == 2.0
