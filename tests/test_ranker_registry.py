"""The ranker registry and the one source of ranker options: the click options, the config
schema and the presets all come from the settings declarations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import preset_names, read_preset
from pipeline.errors import ConfrankError
from pipeline.ranker.registry import KINDS, get_kind, settings_of
from pipeline.ranker.settings import GbmConfig, LOSSES, json_schema, option_specs
from stages import cv as cv_stage
from stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]
#: keys of a config's ranker entry that say what it trains on, not how
DATA_KEYS = {"datasets", "detectors", "train_detectors", "scales", "preset", "split_half", "grid", "inner_folds"}


def test_the_schema_declares_exactly_the_generated_options():
    schema = yaml.safe_load((ROOT / "config" / "config.schema.yaml").read_text())
    declared = schema["$defs"]["ranker_settings"]["properties"]
    assert {k: v for k, v in declared.items() if k not in DATA_KEYS} == json_schema()


@pytest.mark.parametrize("command", [train_stage.cli, cv_stage.run_cli], ids=["train", "cv run"])
def test_every_option_is_on_the_commands_with_its_default(command):
    params = {p.name: p for p in command.params}
    for name, spec in option_specs().items():
        assert name in params, name
        default = params[name].default
        assert (tuple(default.split(",")) if spec.type == "list" and default else default or spec.default) == spec.default


def test_one_set_of_loss_names_and_no_aliases():
    params = {p.name: p for p in train_stage.cli.params}
    assert tuple(params["loss"].type.choices) == LOSSES
    text = "\n".join(p.read_text() for p in [*(ROOT / "config").rglob("*.yaml")])
    assert not re.search(r"loss: (rank|smooth-l1)\b", text)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_resolves_through_the_registry(preset):
    kind, settings = settings_of(read_preset(preset), f"preset {preset}")
    assert kind.name in KINDS and settings.to_dict()


def test_the_feature_ranker_defaults_are_the_cpu_preset():
    cpu = read_preset("cpu")
    _, settings = settings_of(cpu)
    defaults = GbmConfig(evidence=settings.evidence)
    assert settings == defaults


def test_unknown_kind_and_bad_values_name_what_is_wrong():
    with pytest.raises(ConfrankError, match="unknown ranker kind 'forest'; known: network, gbm"):
        get_kind("forest")
    with pytest.raises(ConfrankError, match="gbm_trees: 0 must be >= 1"):
        settings_of({"model": "gbm", "gbm_trees": 0, "gbm_features": ["own"]})
    with pytest.raises(ConfrankError, match="needs --evidence"):
        settings_of({"model": "gbm"})
    with pytest.raises(ConfrankError, match="'colour' is not one of"):
        settings_of({"model": "gbm", "gbm_features": "own,colour"})


def _kind_literals(path: Path) -> list[str]:
    """Comparisons of a value with a kind's name (``x == "gbm"``, ``"network" in ...``) in a file."""
    names = set(KINDS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Constant) and p.value in names for p in parts):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_branch_on_the_ranker_kind_outside_the_registry():
    files = [*(ROOT / "stages").glob("*.py"), ROOT / "pipeline" / "config.py"]
    offenders = [hit for f in files for hit in _kind_literals(f)]
    smk = "\n".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    assert offenders == [] and not re.search(r"""==\s*["'](gbm|network)["']""", smk)
