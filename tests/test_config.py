from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import pytest

from recsys_kd.config import ConfigError, apply_override, from_dict, load_config, to_dict
from recsys_kd.recipe import load_recipe


@dataclass
class Inner:
    lr: float = 1e-3
    layers: List[int] = field(default_factory=lambda: [64, 32])
    kind: Literal["adam", "sgd"] = "adam"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    limit: Optional[float] = None
    sizes: Dict[str, int] = field(default_factory=dict)


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_file_and_overrides(tmp_path):
    path = write(tmp_path, "name: run\ninner:\n  lr: 0.01\n  layers: [8]\nsizes: {a: 3}\n")
    config = load_config(Outer, path, ["inner.kind=sgd", "steps=5", "limit=0.5"])
    assert config == Outer(name="run", steps=5, inner=Inner(lr=0.01, layers=[8], kind="sgd"), limit=0.5, sizes={"a": 3})
    assert from_dict(Outer, to_dict(config)) == config


@dataclass
class TwoSections:
    first: Inner = field(default_factory=Inner)
    second: Inner = field(default_factory=Inner)


def test_an_override_changes_only_its_path_when_sections_share_a_yaml_anchor(tmp_path):
    path = write(tmp_path, "first: &shared {lr: 0.01, layers: [8]}\nsecond: *shared\n")
    config = load_config(TwoSections, path, ["second.lr=0.5", "second.layers=[4, 2]"])
    assert config.first == Inner(lr=0.01, layers=[8])
    assert config.second == Inner(lr=0.5, layers=[4, 2])
    assert load_config(TwoSections, path).second == Inner(lr=0.01, layers=[8])  # the anchor still applies


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(Outer, write(tmp_path, "inner: {lr: 1}\n")).inner.lr == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("nmae: x\n", "unknown key 'nmae' (did you mean 'name'?)"),
        ("inner:\n  lrr: 0.1\n", "unknown key 'inner.lrr' (did you mean 'lr'?)"),
        ("steps: ten\n", "steps: expected an integer, got str 'ten'"),
        ("steps: 1.5\n", "steps: expected an integer"),
        ("inner: {layers: [1, two]}\n", "inner.layers[1]: expected an integer"),
        ("inner: {kind: adamw}\n", "inner.kind: expected one of ['adam', 'sgd'], got 'adamw'"),
        ("inner: 3\n", "inner: expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("limit: yes please\n", "limit: expected a number"),
    ],
)
def test_errors_name_key_and_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(Outer, path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_override_errors_name_the_key(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="unknown key 'inner.depth'"):
        load_config(Outer, path, ["inner.depth=3"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(Outer, path, ["steps"])
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_override({"name": "x"}, "name.sub=1")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_recipe_validation_names_file(tmp_path):
    path = write(tmp_path, "prepare:\n  format: criteo\n  inputs: [a]\n  split: {fractions: [0.5, 0.1, 0.1]}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: prepare.split: split.fractions must sum to 1"):
        load_recipe(path)
    path = write(tmp_path, "prepare:\n  format: parquet\n")
    with pytest.raises(ConfigError, match=r"prepare.format: expected one of"):
        load_recipe(path)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_load(path):
    load_recipe(path)


@pytest.mark.parametrize("path", [p for p in SHIPPED if load_recipe(p).distill is not None],
                         ids=lambda p: p.stem)
def test_shipped_distillation_recipes_are_consistent(path):
    """What a distillation recipe refers to exists within it: each infer teacher is a model name (the
    recipe's train section trains it with train.model.name overridden) whose train section validates;
    distilled teachers are scored by infer; a shared-embedding init_from is a distilled teacher's
    best checkpoint; the FT phase trains the distilled student's architecture."""
    from recsys_kd.models.zoo import MODEL_NAMES

    recipe = load_recipe(path)
    infer_teachers = {spec.name: spec.train_output for spec in recipe.infer.teachers}
    for name in infer_teachers:
        assert name in MODEL_NAMES, f"{path}: infer teacher {name!r} is not a model name"
        load_recipe(path, [f"train.model.name={name}"])
    distill = recipe.distill.distill
    assert distill is not None, f"{path}: distill section without distill.distill"
    if distill.scheme == "pretrain":
        assert set(distill.teachers) <= set(infer_teachers), f"{path}: distilled teachers not all scored by infer"
    if recipe.distill.init_from:
        expected = [f"{infer_teachers[name]}/checkpoints/best" for name in distill.teachers]
        assert recipe.distill.init_from in expected, f"{path}: distill.init_from is no distilled teacher's checkpoint"
    if recipe.finetune is not None:
        assert recipe.finetune.model == recipe.distill.model, f"{path}: FT trains another model than the student"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_configs_state_their_regularisation(path):
    """Every recipe writes out the regularisation of each model it trains (docs/train.md#regularisation):
    the MLP's dropout and batch norm, and the L2 on looked-up embeddings of each optimiser."""
    import yaml

    data = yaml.safe_load(path.read_text())
    sections = {name: data[name] for name in ("train", "distill", "finetune") if data.get(name)}
    assert "train" in sections, f"{path}: no train section"
    for name, section in sections.items():
        assert {"dropout", "batch_norm"} <= set(section["model"]), f"{path}: {name}.model lacks dropout/batch_norm"
        assert "l2_embedding" in section["optim"], f"{path}: {name}.optim lacks l2_embedding"
    compress_optim = (data.get("compress") or {}).get("finetune", {}).get("optim")
    if compress_optim is not None:
        assert "l2_embedding" in compress_optim, f"{path}: compress.finetune.optim lacks l2_embedding"
