"""The experiment tools (tools/kd_experiments.py, tools/compare_models.py) reuse a finished run only
when it was made from the same config and reader: a record of another config is an error naming it,
so a variant can never be reported with another variant's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys_kd.config import to_dict
from recsys_kd.data.reader import ReaderConfig
from recsys_kd.models.zoo import ModelConfig
from recsys_kd.train.config import TrainConfig
from tests.helpers import TOOLS, load_tool


def finished_run(output: Path, config: TrainConfig, reader: ReaderConfig) -> dict:
    record = {"config": to_dict(config), "reader": to_dict(reader), "test": {"auc": 0.75}}
    output.mkdir(parents=True)
    (output / "train.json").write_text(json.dumps(record))
    return record


def test_a_finished_run_is_reused_only_for_its_own_config(tmp_path: Path) -> None:
    train_once = load_tool("kd_experiments").train_once
    config = TrainConfig(model=ModelConfig(name="dnn", mlp_layers=[8]), output=str(tmp_path / "run"), progress=False)
    reader = ReaderConfig(batch_size=64)
    record = finished_run(tmp_path / "run", config, reader)

    assert train_once(config, tmp_path / "run", tmp_path / "no-dataset", reader) == record
    other = TrainConfig(model=ModelConfig(name="dnn", mlp_layers=[8], linear_init="xavier_normal"))
    with pytest.raises(SystemExit, match=r"run/train\.json: made from another config"):
        train_once(other, tmp_path / "run", tmp_path / "no-dataset", reader)
    with pytest.raises(SystemExit, match="made from another config or reader"):
        train_once(config, tmp_path / "run", tmp_path / "no-dataset", ReaderConfig(batch_size=128))


def test_a_distilled_students_peer_is_the_same_methods_student(monkeypatch) -> None:
    """ECKD's distilled DNN is not shown beside RecBole's KD-DAGFM student, nor beside FuxiCTR's
    label-trained DNN; KD-DAGFM's DAGFM-outer student is shown beside RecBole's."""
    monkeypatch.syspath_prepend(str(TOOLS))  # the tool imports tools/peers.py as the scripts do
    peer_of_row = load_tool("kd_experiments").peer_of_row
    assert peer_of_row("movielens-100k", {"role": "student distilled", "model": "dnn"}) == ""
    assert "RecBole KD_DAGFM" in peer_of_row("movielens-100k", {"role": "student distilled", "model": "dagfm_outer"})
    assert "KD_DAGFM_FT" in peer_of_row("movielens-100k", {"role": "student FT", "model": "dagfm_outer"})
    assert "FuxiCTR" in peer_of_row("movielens-100k", {"role": "student label-only", "model": "dnn"})
    assert "FuxiCTR" in peer_of_row("movielens-100k", {"role": "teacher xdeepfm", "model": "xdeepfm"})


def test_a_seed_draws_the_initialisation_and_the_shuffle_order() -> None:
    """Seeds that shared one shuffle order would understate the spread over seeds."""
    load_seeded_recipe = load_tool("kd_experiments").load_seeded_recipe
    recipe_file = TOOLS.parent / "configs" / "movielens_kd_dagfm.yaml"

    recipes = [load_seeded_recipe(recipe_file, [], seed) for seed in (1, 2)]
    assert [(r.train.seed, r.reader.seed) for r in recipes] == [(1, 1), (2, 2)]
    pinned = load_seeded_recipe(recipe_file, ["reader.seed=0"], 2)
    assert (pinned.train.seed, pinned.reader.seed) == (2, 0)
