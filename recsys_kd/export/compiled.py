"""The compiled artifact kind (``export.format: aoti``): the serving module through ``torch.export`` and
AOTInductor, a ``.pt2`` package that loads with torch alone.

The same :class:`~recsys_kd.export.serving.ServingModel` as the TorchScript artifact, minus its input
checks, is exported (``torch.export``, the batch size dynamic) from the fused-table rows to the logits
and compiled by AOTInductor into one shared library of C++ kernels (a multiply fused with its
reduction, no interpreter between ops), packaged with ``schema.json`` and ``model.json`` as extra files.
The input checks are data-dependent (an id out of range raises an error naming it), which an exported
graph cannot hold, so :class:`CompiledServing` runs them before the call, with the very functions the
TorchScript artifact runs (:func:`~recsys_kd.export.inputs.bag_rows`), from the input contract in
``model.json``. It has the artifact's interface: ``module(dense, ids, offsets) -> probabilities [B]``
and ``module.forward_logits(...)``.

A DAGFM head takes its compiler form (:func:`~recsys_kd.export.dagfm_serving.compiled_form`: a
``torch.cond`` between the fused broadcast form for one row and the blocked form), and
:class:`CompiledServing` hands it batches of at most its block size (``compiled.json``). Models
whose schema has a multi-hot feature compile the bag-pooling lookup (``embedding_bag`` with
``offsets``); single-valued ones a plain gather, and then take one id per bag.

Compiling needs a C++ compiler (``g++`` or what ``CXX`` names): without one, :func:`compile_serving`
fails at once with one line saying so (:class:`CompilerMissing`). Loading needs none.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from recsys_kd.export.dagfm_serving import compiled_form
from recsys_kd.export.inputs import bag_rows
from recsys_kd.export.serving import ServingModel

FORMATS = ("torchscript", "aoti")
SUFFIXES = {"torchscript": ".pt", "aoti": ".pt2"}
MAX_BATCH = 1 << 20  # the largest batch the compiled graph accepts (its dynamic dimension's bound)
EXTRA_DIR = "extra"
COMPILED_FILE = "compiled.json"  # how the package wants to be called: {"block_rows": rows per call, 0: any}


class CompilerMissing(RuntimeError):
    """``export.format: aoti`` on a machine without a C++ compiler."""


def cxx_compiler() -> str:
    """The C++ compiler AOTInductor will call (``CXX``, else ``g++``), as a path; raises
    :class:`CompilerMissing` with one line when there is none."""
    name = os.environ.get("CXX") or "g++"
    found = shutil.which(name)
    if found is None:
        raise CompilerMissing(
            f"export.format 'aoti' compiles C++ and needs a C++ compiler: {name!r} is not on PATH "
            "(install g++, e.g. apt-get install g++, or set CXX; or use export.format 'torchscript')"
        )
    return found


class _RowsToLogits(nn.Module):
    """The exported graph: ``(dense [B, n_dense], rows [B * F]) -> logits [B]`` (single-valued bags) or
    ``(dense, rows [N], offsets [B * F + 1]) -> logits [B]`` (multi-hot)."""

    def __init__(self, serving: ServingModel, multi_hot: bool) -> None:
        super().__init__()
        self.serving = serving
        self.multi_hot = multi_hot

    def forward(self, dense: torch.Tensor, rows: torch.Tensor, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        bags = offsets if offsets is not None else rows
        return self.serving.logits_from_rows(dense, rows, bags, single=not self.multi_hot)


def compile_serving(serving: ServingModel, path: Path, extra_files: Dict[str, str], multi_hot: bool) -> None:
    """
    Exports and compiles the serving module into the ``.pt2`` package ``path`` with ``extra_files``.

    Args:
        serving (ServingModel): the module (not modified: a copy is compiled).
        path (Path): the package to write (its name may end in anything; it is written as a zip).
        extra_files (Dict[str, str]): name -> text, e.g. ``schema.json``, ``model.json``.
        multi_hot (bool): whether any bag may hold other than one id (then ``offsets`` is an input).

    Raises:
        CompilerMissing: no C++ compiler.
    """
    cxx_compiler()
    compiled, block_rows = compiled_form(copy.deepcopy(serving).eval())
    module = _RowsToLogits(compiled, multi_hot)
    extra_files = {**extra_files, COMPILED_FILE: json.dumps({"block_rows": 0 if multi_hot else block_rows})}
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    features, rows = serving.num_sparse, 2
    dense = torch.zeros(rows, serving.num_dense_inputs)
    ids = torch.zeros(rows * features, dtype=torch.int64)
    if multi_hot:
        arguments: Tuple[torch.Tensor, ...] = (dense, ids, torch.arange(rows * features + 1))
        dynamic = {"dense": {0: batch}, "rows": {0: torch.export.Dim("ids", min=0, max=MAX_BATCH * 64)},
                   "offsets": {0: batch * features + 1}}
    else:
        arguments = (dense, ids)
        dynamic = {"dense": {0: batch}, "rows": {0: batch * features}}
    with torch.no_grad():
        exported = torch.export.export(module, arguments, dynamic_shapes=dynamic)
        staged = path.with_name(path.name + ".pt2")  # AOTInductor writes only to a name ending in .pt2
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(staged))
            with zipfile.ZipFile(staged, "a") as archive:
                prefix = archive.namelist()[0].split("/", 1)[0]
                for name, text in extra_files.items():
                    archive.writestr(f"{prefix}/{EXTRA_DIR}/{name}", text)
            os.replace(staged, path)
        finally:
            if staged.exists():
                staged.unlink()


def read_extra_files(path: Union[str, Path], names: List[str]) -> Dict[str, str]:
    """The extra files of a ``.pt2`` package ("" for a missing one)."""
    with zipfile.ZipFile(path) as archive:
        found = {name.rsplit("/", 1)[1]: name for name in archive.namelist() if f"/{EXTRA_DIR}/" in name}
        return {name: archive.read(found[name]).decode("utf-8") if name in found else "" for name in names}


def is_compiled_package(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a ``.pt2`` package (AOTInductor) rather than a TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/archive_format") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class CompiledServing:
    """
    A loaded ``.pt2`` artifact with the TorchScript artifact's interface and input checks.

    Args:
        runner: the loaded AOTInductor model (``torch._inductor.aoti_load_package``).
        contract (Dict): ``model.json``'s ``input`` entry (features, ``num_embeddings``, dense width).
        block_rows (int): call the model on at most this many rows at a time (0: any batch at once).

    Example::

        module, metadata = load_artifact("runs/demo/artifacts/student_dagfm_outer.pt2")
        probabilities = module(dense, ids, offsets)  # [B]
    """

    def __init__(self, runner, contract: Dict, block_rows: int = 0) -> None:
        self.runner = runner
        self.block_rows = block_rows
        sparse = contract["sparse_features"]
        limits = torch.tensor([int(f["num_embeddings"]) for f in sparse], dtype=torch.int64)
        self.sparse_names: List[str] = [f["name"] for f in sparse]
        self.multi_hot = any(bool(f["multi_hot"]) for f in sparse)
        self.num_dense_inputs = int(contract["dense"]["shape"][1])
        self.num_embeddings = limits
        self.row_offsets = torch.cumsum(limits, 0) - limits
        self.bag_feature = torch.arange(len(sparse), dtype=torch.int64)

    def __call__(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Probabilities [B] (see :class:`~recsys_kd.export.serving.ServingModel` for the inputs)."""
        return torch.sigmoid(self.forward_logits(dense, ids, offsets))

    forward = __call__

    def forward_logits(self, dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits [B]."""
        if dense.dim() != 2 or dense.size(1) != self.num_dense_inputs:
            raise ValueError(f"dense must have shape [B, {self.num_dense_inputs}] (the schema's dense columns), "
                             f"got {list(dense.shape)}")
        if dense.dtype != torch.float32:
            raise ValueError("dense must be float32")
        batch_size = dense.size(0)
        rows, single = bag_rows(ids, offsets, batch_size, self.num_embeddings, self.row_offsets, self.bag_feature,
                                 self.sparse_names)
        if batch_size == 0:
            return torch.zeros(0)
        if batch_size > MAX_BATCH:
            raise ValueError(f"batch of {batch_size} rows: the compiled artifact takes at most {MAX_BATCH}")
        if self.multi_hot:
            return self.runner(dense.contiguous(), rows, offsets)
        if not single:
            raise ValueError("this compiled artifact's features are single-valued: every bag must hold one id")
        if self.block_rows < 1 or batch_size <= self.block_rows:
            return self.runner(dense.contiguous(), rows)
        features = len(self.sparse_names)
        return torch.cat([self.runner(dense[start: start + self.block_rows].contiguous(),
                                      rows[start * features: (start + self.block_rows) * features])
                          for start in range(0, batch_size, self.block_rows)])


def load_compiled(path: Union[str, Path], extra_names: List[str]) -> Tuple[CompiledServing, Dict[str, str]]:
    """Loads a ``.pt2`` artifact (torch alone, no compiler): the module and its extra files' texts."""
    extra = read_extra_files(path, [*extra_names, COMPILED_FILE])
    contract = json.loads(extra["model.json"])["input"] if extra.get("model.json") else None
    if contract is None:
        return None, extra  # the caller reports the missing metadata
    runner = torch._inductor.aoti_load_package(str(path))
    block_rows = int(json.loads(extra[COMPILED_FILE] or "{}").get("block_rows", 0))
    return CompiledServing(runner, contract, block_rows), extra
