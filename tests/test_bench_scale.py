"""tools/bench_scale.py: the recipe it writes is a valid recipe, stages bring what they need, and the
training rate leaves out the warm-up window. (Its timings are a tool's output, never a test's.)"""

import argparse
import json

from recsys_kd.config import from_dict
from recsys_kd.recipe import Recipe
from tests.helpers import load_tool


def test_the_bench_recipe_validates_and_bounds_the_training_stages(tmp_path):
    tool = load_tool("bench_scale")
    args = argparse.Namespace(max_steps=7, log_every=2, batch_size=256)
    recipe = from_dict(Recipe, tool.recipe(tmp_path / "run", tmp_path / "raw.txt", args), "bench")
    assert recipe.train.max_steps == 7 and recipe.distill.max_steps == 7
    assert recipe.reader.batch_size == 256
    assert recipe.compress.finetune.epochs == 0 and recipe.compress.methods == ["afm"]
    assert recipe.export_source() == tmp_path / "run" / "distill" / tool.STUDENT


def test_a_stage_brings_the_stages_it_needs_in_pipeline_order():
    tool = load_tool("bench_scale")
    assert tool.stages_to_run(["score"]) == ["prepare", "train", "infer", "distill", "export", "score"]
    assert tool.stages_to_run(["prepare"]) == ["prepare"]
    assert tool.stages_to_run(["compress", "prepare"]) == ["prepare", "train", "infer", "distill", "compress"]


def test_the_training_rate_is_the_median_window_after_the_warm_up(tmp_path):
    tool = load_tool("bench_scale")
    log = tmp_path / "metrics.jsonl"
    entries = [{"step": 1, "samples_per_second": 100.0}, {"step": 1, "valid": {"auc": 0.5}},
               {"step": 2, "samples_per_second": 10.0}, {"step": 3, "samples_per_second": 30.0},
               {"step": 4, "samples_per_second": 20.0}]
    log.write_text("\n".join(json.dumps(entry) for entry in entries))
    assert tool.window_rate(log) == 20.0
    log.write_text(json.dumps(entries[0]))
    assert tool.window_rate(log) is None
