"""Export: the serving module (one fused embedding lookup + the model's head, plain tensors in,
probabilities out; AFM-compressed models included), TorchScript or compiled (AOTInductor ``.pt2``)
artifacts with metadata and a parity check, and their torch-only loader. Beside them: ``score`` (batch-score a dataset split or raw logs
with an artifact alone) and ``server`` (the stdlib HTTP JSON endpoint).

Importing this package imports torch only; :func:`export_artifact` imports torchrec when called.
"""

from recsys_kd.export.artifact import ArtifactError, ParityError, export_artifact, load_artifact
from recsys_kd.export.compiled import CompilerMissing, CompiledServing
from recsys_kd.export.serving import ServingModel, example_major_inputs, example_major_weights, script_serving
from recsys_kd.export.tables import quantize_rows_int8

__all__ = [
    "ArtifactError",
    "CompiledServing",
    "CompilerMissing",
    "ParityError",
    "ServingModel",
    "example_major_inputs",
    "example_major_weights",
    "export_artifact",
    "load_artifact",
    "quantize_rows_int8",
    "script_serving",
]
