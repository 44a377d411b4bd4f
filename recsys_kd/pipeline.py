"""The stages that exist, run in order from one recipe, each skipped when its output is complete
and was made from the same config after its inputs: synthesize (raw logs, when the recipe has that
section) -> prepare -> read back (every row of every split through the streaming reader) -> train
the teacher -> infer (soft labels) -> distill (+ FT) the student -> compress it (AFM, each step fine-tuned) ->
export every model of the run (teacher, student, compressed student) as a parity-checked TorchScript
artifact -> score the test split with each artifact alone -> write the report (plots and tables).

Each stage writes a JSON record; the pipeline's own record (``<run_dir>/pipeline.json``) collects
them with the result table, and ``<run_dir>/report.html`` shows them (:mod:`recsys_kd.report`).

On N ranks (``torchrun --nproc_per_node N -m recsys_kd.cli pipeline ...``, or the torchx component)
every stage runs on every rank with its share of the work (prepare, read back, train, infer,
distill, compress, score), except two made by one process by design: ``synthesize`` (one file of
demo logs) and ``export`` (one artifact per model), which rank 0 runs while the others wait for its
verdict. Whether a stage is skipped is rank 0's decision, shared, so the ranks always agree; rank 0
writes ``pipeline.json`` and the report.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from recsys_kd.config import to_dict
from recsys_kd.data.prepare import PrepareConfig, describe_inputs, open_source, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import write_criteo_tsv
from recsys_kd.distributed import DistributedContext, from_rank, gather_outcome, launched_context
from recsys_kd.io import atomic_write_json
from recsys_kd.recipe import Recipe, SynthesizeConfig
from recsys_kd.report import write_report
from recsys_kd.runs import (COMPRESS_RECORD, INFER_RECORD, PIPELINE_RECORD, PREPARE_RECORD, SCORE_RECORD, TRAIN_RECORD,
                            TrainOutput, export_record)

# Config keys that change how a stage runs but not what it produces.
_RUNTIME_KEYS = ("progress", "overwrite", "verify_checkpoints")


def run_pipeline(recipe: Recipe) -> Dict[str, Any]:
    """Runs every stage of ``recipe`` on this process's rank (or alone); returns the record, which
    rank 0 writes as ``<run_dir>/pipeline.json``."""
    started = time.time()
    ranks = launched_context(recipe.train.backend)
    run_dir = Path(recipe.run_dir)
    stages: Dict[str, Any] = {}
    if recipe.synthesize is not None:
        stages["synthesize"] = from_rank(0, lambda: synthesize(recipe.synthesize, progress=recipe.prepare.progress))
    stages["prepare"] = prepare_if_needed(recipe.prepare)
    stages["read_back"] = read_back(Path(recipe.prepare.output), recipe.reader, progress=recipe.prepare.progress,
                                    ranks=ranks)
    stages["train"] = train_if_needed(recipe)
    if recipe.infer.teachers:
        stages["infer"] = infer_stage(recipe)
    if recipe.distill is not None:
        stages.update(distill_if_needed(recipe))
    if recipe.compress is not None:
        stages["compress"] = compress_if_needed(recipe)
    stages["export"] = from_rank(0, lambda: export_all(recipe))  # one artifact per model: one process
    stages["score"] = score_all(recipe, stages["export"])
    record = {"stages": stages, "world_size": ranks.world_size, "seconds": round(time.time() - started, 3)}
    from_rank(0, lambda: atomic_write_json(run_dir / PIPELINE_RECORD, record))
    from_rank(0, lambda: str(write_report(run_dir, record, result_tables(record))))  # one page: one process
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
    previous = from_rank(0, lambda: _prepared(config))
    if previous is not None:
        return {**previous, "skipped": True}
    config.overwrite = True
    return {**prepare(config), "skipped": False}


def _prepared(config: PrepareConfig) -> Optional[Dict[str, Any]]:
    """The record of an earlier prepare of the same config over the same inputs, or None."""
    record_path = Path(config.output) / PREPARE_RECORD
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        same_config = _stable(previous.get("config", {})) == _stable(to_dict(config))
        same_inputs = previous.get("inputs") == describe_inputs(open_source(config).info.inputs)
        if same_config and same_inputs:
            return previous
    return None


def train_if_needed(recipe: Recipe) -> Dict[str, Any]:
    """Trains ``recipe.train`` unless its output holds a finished record of the same config and data
    (an unfinished run resumes from its last checkpoint)."""
    recipe.train.output = str(recipe.train_output())
    return _train_config_if_needed(recipe.train, recipe)


def infer_stage(recipe: Recipe) -> Dict[str, Any]:
    """Scores the logs with the teachers; finished parts are kept, so a complete output costs only
    its verification."""
    from recsys_kd.distill.infer import infer

    recipe.infer.output = str(recipe.infer_output())
    recipe.infer.progress = recipe.train.progress
    teachers = [Path(teacher.train_output) / TRAIN_RECORD for teacher in recipe.infer.teachers]
    from_rank(0, lambda: _reusable_record(Path(recipe.infer.output), INFER_RECORD, teachers))  # stale: removed
    return infer(recipe.infer, Path(recipe.prepare.output))


def distill_if_needed(recipe: Recipe) -> Dict[str, Any]:
    """The student (and its FT phase), each skipped when already trained with the same config."""
    from recsys_kd.distill.task import distill

    recipe.resolve_distill()
    stages = {"distill": _train_config_if_needed(recipe.distill, recipe, distill)}
    if recipe.finetune is not None:
        stages["finetune"] = _train_config_if_needed(recipe.finetune, recipe)
    return stages


def compress_if_needed(recipe: Recipe) -> Dict[str, Any]:
    """Compresses the student (or the trained model) unless the same config already did; a finished
    step of an interrupted run is kept, a run of another config is replaced."""
    from recsys_kd.compress.stage import compress

    config = resolve_compress(recipe)
    config.progress = recipe.train.progress
    previous = from_rank(0, lambda: _compressed(config))
    if previous is not None:
        return {**previous, "skipped": True}
    return {**compress(config, recipe.reader), "skipped": False}


def _compressed(config) -> Optional[Dict[str, Any]]:
    """The record of an earlier compression of the same config made after its source, or None (any
    other run is removed)."""
    return _reusable_record(Path(config.output), COMPRESS_RECORD, [Path(config.source) / TRAIN_RECORD],
                            lambda previous: _stable(previous.get("config", {})) == _stable(to_dict(config)))


def resolve_compress(recipe: Recipe):
    """The recipe's ``compress`` section with its source and output filled in (the output's default
    names the source's model, read from its record)."""
    config = recipe.compress
    config.source = str(recipe.compress_source())
    config.output = str(recipe.compress_output(TrainOutput(config.source).model_name))
    return config


def models_to_export(recipe: Recipe) -> Dict[str, Path]:
    """Role -> train output: ``export.source`` alone when set, else every model the run made: the
    teacher, the (fine-tuned) student, and the AFM-compressed model."""
    if recipe.export.source:
        return {"model": Path(recipe.export.source)}
    models = {"teacher": recipe.train_output()}
    if recipe.distill is not None:
        models["student"] = recipe.student_output()
    if recipe.compress is not None:
        record = json.loads((Path(resolve_compress(recipe).output) / COMPRESS_RECORD).read_text())
        method = "afm" if "afm" in record["final"] else next(iter(record["final"]))
        models["compressed"] = Path(record["final"][method])
    return models


def export_all(recipe: Recipe) -> Dict[str, Any]:
    return {role: export_if_needed(recipe, role, source) for role, source in models_to_export(recipe).items()}


def export_if_needed(recipe: Recipe, role: str, source: Path) -> Dict[str, Any]:
    """Exports one model as a TorchScript artifact (parity-checked) unless it is up to date."""
    from recsys_kd.export import export_artifact

    name = TrainOutput(source).model_name
    output = recipe.export_output(name if role == "model" else f"{role}_{name}")
    previous = export_record(output)
    if output.exists() and previous.exists():
        record = json.loads(previous.read_text())
        checkpoint_metadata = Path(record["checkpoint"]) / ".metadata"
        same_source = record.get("train_output") == str(source)
        if same_source and checkpoint_metadata.exists() and checkpoint_metadata.stat().st_mtime <= output.stat().st_mtime:
            return {**record, "skipped": True}
    record = export_artifact(source, output, checkpoint=recipe.export.checkpoint, dtype=recipe.export.dtype,
                             parity_rows=recipe.export.parity_rows, dataset=recipe.prepare.output,
                             format=recipe.export.format)
    return {**record, "skipped": False}


def score_all(recipe: Recipe, exported: Dict[str, Any]) -> Dict[str, Any]:
    """Scores the test split with each artifact alone (no training code), the serving-side check of
    the whole run; an artifact's score is kept while the artifact is unchanged."""
    from recsys_kd.export.score import score_dataset

    scored = {}
    for role, record in exported.items():
        artifact = Path(record["artifact"])
        output = Path(recipe.run_dir) / "scores" / artifact.stem
        previous = from_rank(0, lambda: _scored(artifact, output))
        if previous is not None:
            scored[role] = {**previous, "skipped": True}
            continue
        result = score_dataset(artifact, recipe.prepare.output, output, split="test", overwrite=True,
                               progress=recipe.train.progress)
        scored[role] = {**result, "skipped": False}
    return scored


def _scored(artifact: Path, output: Path) -> Optional[Dict[str, Any]]:
    """The record of an earlier score of this artifact (unchanged since), or None."""
    previous = output / SCORE_RECORD
    if previous.exists() and previous.stat().st_mtime >= artifact.stat().st_mtime:
        return json.loads(previous.read_text())
    return None


def _reusable_record(output: Path, record_name: str, inputs: List[Path],
                     same: Callable[[Dict[str, Any]], bool] = lambda previous: True) -> Optional[Dict[str, Any]]:
    """The finished record in ``output`` when ``same(record)`` holds and it was written after every
    input record that exists; otherwise None, and a finished output that fails either test is
    removed (a stage made before its inputs were remade, a retrained teacher or a re-distilled
    student, is stale)."""
    record_path = output / record_name
    if not record_path.exists():
        return None
    previous = json.loads(record_path.read_text())
    made = record_path.stat().st_mtime
    if same(previous) and all(made >= path.stat().st_mtime for path in inputs if path.exists()):
        return previous
    shutil.rmtree(output)
    return None


def _train_config_if_needed(config, recipe: Recipe, stage=None) -> Dict[str, Any]:
    """Runs ``stage`` (the trainer, or the distill stage) unless ``config.output`` holds a finished
    record of the same config and reader, written after the records of its inputs (the prepared
    data, the ``init_from`` run, the soft labels). A finished run that fails either test is removed
    and trained again from the start: resuming it would continue a finished run of other settings."""
    from recsys_kd.train.trainer import train

    inputs = [Path(recipe.prepare.output) / PREPARE_RECORD]
    if config.init_from:
        inputs.append(TrainOutput(Path(config.init_from).parent.parent).record_path)
    if getattr(config, "distill", None) is not None and config.distill.soft_labels:
        inputs.append(Path(config.distill.soft_labels) / INFER_RECORD)

    def same(previous: Dict[str, Any]) -> bool:
        return (_stable(previous.get("config", {})) == _stable(to_dict(config))
                and previous.get("reader") == to_dict(recipe.reader))

    previous = from_rank(0, lambda: _reusable_record(Path(config.output), TRAIN_RECORD, inputs, same))
    if previous is not None:
        return {**previous, "skipped": True}
    return {**(stage or train)(config, Path(recipe.prepare.output), recipe.reader), "skipped": False}


def read_back(dataset: Path, reader_config: ReaderConfig, progress: bool = True,
              ranks: Optional[DistributedContext] = None) -> Dict[str, Any]:
    """Streams every split once through the reader, each rank its share; checks the rows all ranks
    read against the schema."""
    rank, world_size = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)

    def read() -> Dict[str, Any]:
        schema = Schema.load(dataset)
        result: Dict[str, Any] = {}
        for split in schema.splits:
            reader = ParquetReader(dataset, split, reader_config, rank=rank, world_size=world_size)
            started = time.time()
            rows = positives = 0
            for batch in reader:
                rows += batch.batch_size
                positives += int(batch.labels.sum().item())
            result[split] = {"rows": rows, "positives": positives, "seconds": time.time() - started}
        return result

    per_rank = gather_outcome(read)
    schema = Schema.load(dataset)
    result: Dict[str, Any] = {}
    for split, info in schema.splits.items():
        rows = sum(r[split]["rows"] for r in per_rank)
        seconds = max(r[split]["seconds"] for r in per_rank)
        if rows != info.rows:
            raise RuntimeError(f"read back {dataset}/{split}: read {rows} rows, schema says {info.rows}")
        result[split] = {
            "rows": rows,
            "positives": sum(r[split]["positives"] for r in per_rank),
            "seconds": round(seconds, 3),
            "rows_per_second": round(rows / max(seconds, 1e-9), 1),
        }
    return result


def model_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per trained model and phase: test AUC/logloss, parameters, FLOPs, training speed."""
    rows = []
    for stage in ("train", "distill", "finetune"):
        result = record["stages"].get(stage)
        if result:
            rows.append({
                "stage": stage,
                "model": result["model"],
                "test auc": round(result["test"]["auc"], 5),
                "test logloss": round(result["test"]["logloss"], 5),
                "params": result["parameters"]["total"],
                "flops/example": result["flops_per_example"],
                "train samples/s": f"{result['samples_per_second_this_run']:,.0f}",
            })
    compressed = record["stages"].get("compress")
    if compressed:
        for method, chain in compressed["chains"].items():
            for row in chain[1:]:
                rows.append({
                    "stage": f"{method}: {row['stage']}",
                    "model": row["model"],
                    "test auc": round(row["test_auc"], 5),
                    "test logloss": round(row["test_logloss"], 5),
                    "params": row["parameters"],
                    "flops/example": row["flops_per_example"],
                    "train samples/s": "",
                })
    return rows


def artifact_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per exported artifact: size, parity, batch-1 latency, and the test AUC scored from the
    artifact alone."""
    rows = []
    scores = record["stages"].get("score", {})
    for role, exported in record["stages"].get("export", {}).items():
        metrics = (scores.get(role) or {}).get("metrics") or {}
        rows.append({
            "artifact": role,
            "model": exported["model"],
            "size MiB": round(exported["size_bytes"] / 2**20, 2),
            "parity max |dp|": f"{exported['parity']['max_abs_diff']:.1e}",
            "batch-1 latency ms": round(exported["latency_batch1_ms"] or float("nan"), 3),
            "scored test auc": round(metrics["auc"], 5) if "auc" in metrics else None,
            "score rows/s": f"{scores[role]['rows_per_second']:,.0f}" if role in scores else "",
        })
    return rows


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


def result_tables(record: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """The tables the pipeline prints, by title: splits, models, artifacts."""
    return {"splits": summary_rows(record, Path(record["stages"]["prepare"]["output"])),
            "models": model_rows(record), "artifacts": artifact_rows(record)}


def _stable(config: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _RUNTIME_KEYS}
