"""The stages that exist, run in order from one recipe, each skipped when its output is complete
and was made from the same config: synthesize (raw logs, when the recipe has that section) ->
prepare -> read back (every row of every split through the streaming reader) -> train.

Each stage writes a JSON record; the pipeline's own record (``<run_dir>/pipeline.json``) collects
them with the result table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List

from recsys_kd.config import to_dict
from recsys_kd.data.prepare import RECORD_FILE, PrepareConfig, describe_inputs, open_source, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import write_criteo_tsv
from recsys_kd.io import atomic_write_json
from recsys_kd.recipe import Recipe, SynthesizeConfig

# Config keys that change how a stage runs but not what it produces.
_RUNTIME_KEYS = ("progress", "overwrite")


def run_pipeline(recipe: Recipe) -> Dict[str, Any]:
    started = time.time()
    run_dir = Path(recipe.run_dir)
    stages: Dict[str, Any] = {}
    if recipe.synthesize is not None:
        stages["synthesize"] = synthesize(recipe.synthesize, progress=recipe.prepare.progress)
    stages["prepare"] = prepare_if_needed(recipe.prepare)
    stages["read_back"] = read_back(Path(recipe.prepare.output), recipe.reader, progress=recipe.prepare.progress)
    stages["train"] = train_if_needed(recipe)
    record = {"stages": stages, "seconds": round(time.time() - started, 3)}
    atomic_write_json(run_dir / "pipeline.json", record)
    return record


def synthesize(config: SynthesizeConfig, progress: bool = True) -> Dict[str, Any]:
    """Writes the synthetic raw logs unless the same config already made them."""
    path = Path(config.path)
    record_path = path.with_name(path.name + ".json")
    wanted = to_dict(config.synthetic)
    if path.exists() and record_path.exists():
        previous = json.loads(record_path.read_text())
        if previous.get("config") == wanted:
            return {**previous, "skipped": True}
    record = {"stage": "synthesize", "path": str(path), "config": wanted}
    started = time.time()
    record.update(write_criteo_tsv(config.synthetic, path, progress=progress))
    record["seconds"] = round(time.time() - started, 3)
    atomic_write_json(record_path, record)
    return {**record, "skipped": False}


def prepare_if_needed(config: PrepareConfig) -> Dict[str, Any]:
    """Runs ``prepare`` unless its output holds a record of the same config over the same inputs."""
    record_path = Path(config.output) / RECORD_FILE
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        same_config = _stable(previous.get("config", {})) == _stable(to_dict(config))
        same_inputs = previous.get("inputs") == describe_inputs(open_source(config).info.inputs)
        if same_config and same_inputs:
            return {**previous, "skipped": True}
    config.overwrite = True
    return {**prepare(config), "skipped": False}


def train_if_needed(recipe: Recipe) -> Dict[str, Any]:
    """Trains ``recipe.train`` unless its output holds a finished record of the same config and data
    (an unfinished run resumes from its last checkpoint)."""
    from recsys_kd.train.trainer import RECORD_FILE, train

    recipe.train.output = str(recipe.train_output())
    record_path = Path(recipe.train.output) / RECORD_FILE
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        same = _stable(previous.get("config", {})) == _stable(to_dict(recipe.train)) and previous.get("reader") == to_dict(recipe.reader)
        if same and previous.get("dataset") == str(Path(recipe.prepare.output)):
            return {**previous, "skipped": True}
    return {**train(recipe.train, Path(recipe.prepare.output), recipe.reader), "skipped": False}


def read_back(dataset: Path, reader_config: ReaderConfig, progress: bool = True) -> Dict[str, Any]:
    """Streams every split once through the reader; checks the row counts against the schema."""
    schema = Schema.load(dataset)
    result: Dict[str, Any] = {}
    for split, info in schema.splits.items():
        reader = ParquetReader(dataset, split, reader_config, rank=0, world_size=1)
        started = time.time()
        rows = positives = 0
        for batch in reader:
            rows += batch.batch_size
            positives += int(batch.labels.sum().item())
        seconds = time.time() - started
        if rows != info.rows:
            raise RuntimeError(f"read back {dataset}/{split}: read {rows} rows, schema says {info.rows}")
        result[split] = {
            "rows": rows,
            "positives": positives,
            "seconds": round(seconds, 3),
            "rows_per_second": round(rows / max(seconds, 1e-9), 1),
        }
    return result


def model_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per trained model: test AUC/logloss, parameters, FLOPs, training speed."""
    train = record["stages"].get("train")
    if not train:
        return []
    return [{
        "model": train["model"],
        "test auc": round(train["test"]["auc"], 5),
        "test logloss": round(train["test"]["logloss"], 5),
        "params": train["parameters"]["total"],
        "flops/example": train["flops_per_example"],
        "train samples/s": f"{train['samples_per_second_this_run']:,.0f}",
    }]


def summary_rows(record: Dict[str, Any], dataset: Path) -> List[Dict[str, Any]]:
    """One row per split: rows, positives, CTR, parts, read-back speed."""
    schema = Schema.load(dataset)
    rows = []
    for split, info in schema.splits.items():
        read = record["stages"]["read_back"].get(split, {})
        rows.append({
            "split": split,
            "rows": info.rows,
            "positives": info.positives,
            "ctr": round(info.positives / info.rows, 4) if info.rows else 0.0,
            "parts": len(info.files),
            "read rows/s": f"{read.get('rows_per_second', 0):,.0f}",
        })
    return rows


def _stable(config: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _RUNTIME_KEYS}
