"""What stages hand each other: the names of the files they exchange, and :class:`TrainOutput`.

A stage's output is a directory. This module is the one place that names the files inside, and
``TrainOutput`` is the one reader of a model-producing stage's output (``train``, ``distill``, its FT
phase, or a ``compress`` step): its record, its model config, its checkpoints. Nothing here imports
torch, so the CLI, the pipeline and the tools can read outputs without loading the training stack;
building the model from a ``TrainOutput`` is :func:`recsys_kd.train.checkpoint.load_model`.

Layout of a model output::

    <output>/train.json            the record (``compress_step.json`` for a compress step)
    <output>/metrics.jsonl         training and evaluation metrics, one JSON object a line
    <output>/checkpoints/best/     the best model (DCP)
    <output>/checkpoints/step_*/   periodic checkpoints with every rank's loop state
    <output>/checkpoints/latest    the newest complete step_* name

Example::

    source = TrainOutput("runs/demo/train/dcnv2")
    source.model_name, source.dataset, source.checkpoint("best"), source.metrics()

A pipeline run directory holds ``pipeline.json`` (every stage's record, :func:`pipeline_record`) and
``report.html`` (the plots and tables of the run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

PREPARE_RECORD = "prepare.json"
SCHEMA_FILE = "schema.json"
QUARANTINE_FILE = "quarantine.jsonl"
TRAIN_RECORD = "train.json"
COMPRESS_STEP_RECORD = "compress_step.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
LATEST = "latest"
INFER_RECORD = "infer.json"
SIDE_INPUT_FILE = "side.json"
COMPRESS_RECORD = "compress.json"
SCORE_RECORD = "score.json"
EXPORT_RECORD_SUFFIX = ".export.json"
PIPELINE_RECORD = "pipeline.json"
REPORT_FILE = "report.html"
MODEL_RECORDS = (TRAIN_RECORD, COMPRESS_STEP_RECORD)


class OutputError(ValueError):
    """A stage output is missing, incomplete, or not what the caller needs; the message names the path."""


def export_record(artifact: Union[str, Path]) -> Path:
    """The JSON record beside an exported artifact: ``model.pt`` -> ``model.pt.export.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + EXPORT_RECORD_SUFFIX)


def pipeline_record(run_dir: Union[str, Path]) -> Dict[str, Any]:
    """The pipeline's record of a run directory (``<run_dir>/pipeline.json``: ``stages``, ``seconds``)."""
    path = Path(run_dir) / PIPELINE_RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(f"{path} not found; is {run_dir} a run directory of recsys-kd pipeline (and did it finish)?") from None
    except json.JSONDecodeError as error:
        raise OutputError(f"{path}: not valid JSON ({error})") from None


class TrainOutput:
    """A model-producing stage's output directory: ``train``, ``distill`` (and its FT phase), or one
    ``compress`` step.

    Args:
        path: the output directory.

    Raises on first use of :attr:`record` when the directory has no record (``OutputError`` naming
    the path and what would have made it).
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._record: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"TrainOutput({str(self.path)!r})"

    @property
    def record_path(self) -> Path:
        """The record file present (``train.json`` unless a compress step wrote ``compress_step.json``)."""
        for name in MODEL_RECORDS:
            if (self.path / name).exists():
                return self.path / name
        return self.path / TRAIN_RECORD

    def finished(self) -> bool:
        """Whether the stage finished: its record is written last, atomically."""
        return any((self.path / name).exists() for name in MODEL_RECORDS)

    @property
    def record(self) -> Dict[str, Any]:
        if self._record is None:
            path = self.record_path
            try:
                self._record = json.loads(path.read_text())
            except FileNotFoundError:
                raise OutputError(
                    f"{path} not found; is {self.path} the output of train, distill or compress (and did it finish)?"
                ) from None
            except json.JSONDecodeError as error:
                raise OutputError(f"{path}: not valid JSON ({error})") from None
        return self._record

    @property
    def model_name(self) -> str:
        return self.record["model"]

    @property
    def dataset(self) -> Path:
        return Path(self.record["dataset"])

    @property
    def config(self) -> Dict[str, Any]:
        """The training config as recorded (a ``TrainConfig`` mapping; validate it with ``from_dict``)."""
        return self.record["config"]

    @property
    def model_config(self) -> Dict[str, Any]:
        """The model config as recorded (a ``ModelConfig`` mapping)."""
        return self.config["model"]

    @property
    def test_metrics(self) -> Optional[Dict[str, Any]]:
        return self.record.get("test")

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_log(self) -> Path:
        return self.path / METRICS_LOG

    def metrics(self) -> List[Dict[str, Any]]:
        """The metrics log's entries in step order: training entries (``loss``, ``lr``,
        ``samples_per_second``) and evaluations (``valid``, ``lr``). A resumed run logs again the
        steps after its checkpoint: the later entry of a step and kind wins. A line torn by a kill
        (the resumed run appends after it) is not JSON and is left out. Empty when there is no log."""
        if not self.metrics_log.exists():
            return []
        entries: Dict[Tuple[int, bool], Dict[str, Any]] = {}
        for line in self.metrics_log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "step" in entry:
                entries[(int(entry["step"]), "valid" in entry)] = entry
        return [entries[key] for key in sorted(entries)]

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    def latest(self) -> Optional[Path]:
        """The newest complete step checkpoint, or None before the first one."""
        pointer = self.checkpoints / LATEST
        if not pointer.exists():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        if not is_checkpoint(path):
            raise OutputError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path

    def checkpoint(self, name: str = BEST) -> Path:
        """A checkpoint directory by name: ``best``, ``latest``, a ``step_*`` name, or a path."""
        if name == LATEST:
            path = self.latest()
            if path is None:
                raise OutputError(f"{self.checkpoints}: no complete step checkpoint (no '{LATEST}' pointer)")
            return path
        path = Path(name) if Path(name).is_absolute() or os.sep in name else self.checkpoints / name
        if not is_checkpoint(path):
            raise OutputError(f"{path}: not a checkpoint (no .metadata); known: {', '.join(self.known_checkpoints()) or 'none'}")
        return path

    def known_checkpoints(self) -> List[str]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if is_checkpoint(p))


def is_checkpoint(path: Path) -> bool:
    """A complete DCP checkpoint directory (its ``.metadata`` is written last)."""
    return (Path(path) / ".metadata").exists()
