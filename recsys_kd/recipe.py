"""A recipe: one YAML file per dataset x method, one section per stage.

Stages read only their own section; sections for stages that do not run are allowed and ignored.
Relative paths are relative to the working directory the command runs in.

Example (configs/demo.yaml)::

    run_dir: runs/demo
    synthesize: {path: runs/demo/raw/train.txt, synthetic: {rows: 400000}}
    prepare: {format: criteo, inputs: [runs/demo/raw/train.txt], output: runs/demo/data}
    reader: {batch_size: 4096}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from recsys_kd.compress.stage import CompressConfig
from recsys_kd.config import load_config
from recsys_kd.data.prepare import PrepareConfig
from recsys_kd.data.reader import ReaderConfig
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.distill.config import StudentConfig
from recsys_kd.distill.infer import InferConfig
from recsys_kd.runs import TrainOutput
from recsys_kd.train.config import TrainConfig


@dataclass
class SynthesizeConfig:
    """Raw synthetic logs in a public format (Criteo TSV), for the demo and benchmarks."""

    path: str = "runs/demo/raw/train.txt"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ExportConfig:
    """The serving artifacts. ``recsys-kd export``: from ``source`` (a train, distill or compress
    output; default: the (fine-tuned) student when the recipe distils, else the trained model) to
    ``output`` (default ``<run_dir>/artifacts/<model>.pt``). The pipeline exports ``source`` alone when
    set, else every model of the run: ``<run_dir>/artifacts/{teacher,student,compressed}_<model>.pt``.
    ``format``: ``torchscript`` (scripted and frozen, ``.pt``) or ``aoti`` (``torch.export`` +
    AOTInductor, a compiled ``.pt2`` package; needs a C++ compiler; the default names end in ``.pt2``)."""

    source: str = ""
    output: str = ""
    checkpoint: str = "best"
    dtype: Literal["float32", "fp16", "int8"] = "float32"
    parity_rows: int = 2048
    format: Literal["torchscript", "aoti"] = "torchscript"


@dataclass
class Recipe:
    run_dir: str = "runs/default"
    synthesize: Optional[SynthesizeConfig] = None
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    distill: Optional[StudentConfig] = None
    finetune: Optional[TrainConfig] = None
    compress: Optional[CompressConfig] = None
    export: ExportConfig = field(default_factory=ExportConfig)

    def train_output(self) -> Path:
        """Where ``train`` writes: ``train.output``, or ``<run_dir>/train/<model name>``."""
        return Path(self.train.output or Path(self.run_dir) / "train" / self.train.model.name)

    def distill_output(self) -> Path:
        """Where ``distill`` writes the student: ``distill.output``, or ``<run_dir>/distill/<student>``."""
        return Path(self.distill.output or Path(self.run_dir) / "distill" / self.distill.model.name)

    def resolve_distill(self) -> None:
        """Fills the distill and FT sections' defaults: where the student goes, its soft labels
        (the pre-train scheme's default is this recipe's infer output), and the FT phase's output and
        starting point (the distilled student's best model)."""
        output = self.distill_output()
        self.distill.output = str(output)
        if self.distill.distill.scheme == "pretrain" and not self.distill.distill.soft_labels:
            self.distill.distill.soft_labels = str(self.infer_output())
        if self.finetune is not None:
            self.finetune.output = self.finetune.output or str(output / "ft")
            self.finetune.init_from = self.finetune.init_from or str(TrainOutput(output).best)

    def student_output(self) -> Path:
        """The model the later stages start from: the fine-tuned student when the recipe distils
        (with an FT phase), the distilled student, else the trained model."""
        if self.distill is not None:
            return self.distill_output() / "ft" if self.finetune is not None else self.distill_output()
        return self.train_output()

    def compress_source(self) -> Path:
        return Path(self.compress.source) if self.compress.source else self.student_output()

    def compress_output(self, model_name: str) -> Path:
        """Where ``compress`` writes: ``compress.output``, or ``<run_dir>/compress/<model>``."""
        return Path(self.compress.output or Path(self.run_dir) / "compress" / model_name)

    def export_source(self) -> Path:
        """What ``recsys-kd export`` exports: ``export.source``, else the student (see ``student_output``)."""
        return Path(self.export.source) if self.export.source else self.student_output()

    def export_output(self, model_name: str) -> Path:
        suffix = ".pt2" if self.export.format == "aoti" else ".pt"
        return Path(self.export.output or Path(self.run_dir) / "artifacts" / f"{model_name}{suffix}")

    def infer_output(self) -> Path:
        """Where ``infer`` writes the soft labels: ``infer.output``, or ``<run_dir>/soft_labels``."""
        return Path(self.infer.output or Path(self.run_dir) / "soft_labels")


def load_recipe(path: Union[str, Path, None], overrides: Sequence[str] = ()) -> Recipe:
    return load_config(Recipe, path, overrides)
