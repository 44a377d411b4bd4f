"""
Serving variants compared: the torch-only artifact against torchrec/fbgemm-kernel artifacts of the same models.

Issue 6 asks that the artifact load with torch alone, or, for a variant on fbgemm/torchrec kernels,
with exactly one documented op library, and that the choice be measured. For each model this
builds, saves (``torch.jit.save``) and loads back:

- ``torch-only``: the project's artifact, ``ServingModel.from_model`` + ``script_serving`` (what
  ``export_artifact`` saves, less its few-KB metadata files), input ``(dense, ids, offsets)``; float32 and
  int8 fused table;
- ``torchrec EBC``: the model's own ``CTRModel`` scripted as it is (torchrec ``EmbeddingBagCollection``,
  one ``nn.EmbeddingBag`` per table, input ``(dense, KeyedJaggedTensor)``);
- ``torchrec TBE``: torchrec's inference path: the tables swapped for torchrec's quantized
  ``EmbeddingBagCollection`` (``torchrec.inference.modules.quantize_inference_model``: one fbgemm
  ``IntNBitTableBatchedEmbeddingBagsCodegen`` lookup for all tables) with float32 and int8 weights,
  around the model's dense projection and head, ``torchrec.fx.symbolic_trace``-d (the head a leaf) and
  scripted, input ``(dense, KeyedJaggedTensor)``. The model itself cannot take this path: ``CTRModel``
  checks input shapes in Python, which fx cannot trace, and torchrec's quantized EBC does not script
  without fx (``getattr`` with a non-literal name).

Per variant: artifact bytes; which libraries ``torch.jit.load`` needs (a fresh process tries torch
alone, then ``import fbgemm_gpu``) and the ``fbgemm::`` ops its code references; batch-1 p50/p99 ms and
batch-N rows/s with one torch thread, every variant on the same rows (inputs built beforehand), all
timed in turns (``bench_serving.measure``); max |probability difference| against the training model.

Models: the demo pipeline's teacher (``runs/demo/train/dcnv2``) and distilled student
(``runs/demo/distill/dagfm_outer/ft``), loaded as ``export_artifact`` loads them, with the demo
dataset's test rows, once ``runs/demo/pipeline.json`` exists; otherwise untrained models of the
serving benchmark's configurations (tables drawn visibly, ``tests/helpers.visible_model``) on a
Criteo-shaped schema (13 dense, 26 sparse features of 100,000 ids) with random rows.

    .venv/bin/python tools/bench_serving_variants.py [--demo runs/demo] [--seconds 6] [--json out.json]
"""

import argparse
import copy
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]
from bench_serving import STUDENTS, TEACHERS, measure  # noqa: E402  (the serving benchmark's timing loop)

Model = Tuple[str, nn.Module, Any, Optional[Path]]  # label, model, schema, dataset (None: random rows)
DEMO_MODELS = {"teacher dcnv2": "train/dcnv2", "student dagfm_outer": "distill/dagfm_outer/ft"}
LOAD_CHECK = """
import sys, torch
try:
    torch.jit.load(sys.argv[1])
    print("torch")
except RuntimeError as error:
    unknown = [line for line in str(error).splitlines() if line.startswith("Unknown builtin op")]
    op = unknown[0].split(": ", 1)[1].rstrip(".") if unknown else "?"
    import fbgemm_gpu  # noqa: F401
    torch.jit.load(sys.argv[1])
    print(f"torch + fbgemm_gpu (torch alone: unknown op {op})")
"""


class Probabilities(nn.Module):
    """A ``CTRModel`` as it is (torchrec EBC, KJT input), returning probabilities like the artifacts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, features))


class TableBatchedServing(nn.Module):
    """The model's tables in one torchrec EBC (to be swapped for the quantized, fbgemm-TBE one), its
    dense projection and its head: ``(dense [B, n_dense], KJT) -> probabilities [B]``. Models with a
    first-order term or AFM-compressed tables are not covered."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        embedding = model.embedding
        if model.first_order is not None or not hasattr(embedding, "ebc"):
            raise ValueError(f"{model.name}: only models without a first-order term and with full tables")
        names = [config.feature_names for config in embedding.ebc.embedding_bag_configs()]
        if names != [[name] for name in embedding._sparse_names]:
            raise ValueError(f"{model.name}: tables {names} are not one per sparse feature in schema order")
        self.ebc = copy.deepcopy(embedding.ebc)
        self.head = copy.deepcopy(model.head)
        dense_weight = embedding.dense_weight
        self.register_buffer("dense_weight", torch.zeros(0, embedding.embedding_dim) if dense_weight is None
                             else dense_weight.detach().clone())
        self.num_dense = int(self.dense_weight.shape[0])
        self.num_sparse = len(names)
        self.embedding_dim = int(embedding.embedding_dim)

    def forward(self, dense: torch.Tensor, features: KeyedJaggedTensor) -> torch.Tensor:
        sparse = self.ebc(features).values().reshape(-1, self.num_sparse, self.embedding_dim)
        fields = torch.cat([dense[:, : self.num_dense].unsqueeze(2) * self.dense_weight, sparse], dim=1)
        return torch.sigmoid(self.head(fields))


# ------------------------------------------------------------------------------------ models, rows


def demo_models(demo: Path) -> List[Model]:
    """(label, model, schema, dataset) of the demo's teacher and distilled student, as export_artifact loads them."""
    from recsys_kd.data.schema import Schema
    from recsys_kd.runs import TrainOutput
    from recsys_kd.train.checkpoint import load_model

    models = []
    for label, relative in DEMO_MODELS.items():
        output = TrainOutput(demo / relative)
        models.append((label, load_model(output), Schema.load(output.dataset), output.dataset))
    return models


def synthetic_models() -> List[Model]:
    """(label, model, schema, no dataset): untrained DCNv2 teacher and DAGFM student on a Criteo-shaped schema."""
    from helpers import visible_model

    from recsys_kd.data.schema import IdRule, Schema, SparseFeature

    schema = Schema(name="criteo-shaped", label="label", dense=[f"I{i}" for i in range(1, 14)],
                    sparse=[SparseFeature(f"C{i}", 100_000, IdRule(kind="identity")) for i in range(1, 27)])
    return [("teacher dcnv2 (untrained)", visible_model(schema, "dcnv2", embedding_dim=16, **TEACHERS["dcnv2"]),
             schema, None),
            ("student dagfm_outer (untrained)",
             visible_model(schema, "dagfm_outer", embedding_dim=16, **STUDENTS["dagfm_outer"]), schema, None)]


def test_batch(schema: Any, dataset: Optional[Path], rows: int) -> Any:
    """A reader ``Batch`` of the first ``rows`` test rows of ``dataset``, or random rows when it is None."""
    if dataset is None:
        from helpers import tiny_batch

        return tiny_batch(schema, seed=0, batch_size=rows)
    from recsys_kd.data.reader import ParquetReader, ReaderConfig

    reader = ParquetReader(dataset, "test", ReaderConfig(batch_size=rows, shuffle=False), rank=0, world_size=1)
    return next(iter(reader))


def single_rows(
    dense: torch.Tensor, features: KeyedJaggedTensor, count: int
) -> List[Tuple[torch.Tensor, KeyedJaggedTensor]]:
    """The first ``count`` examples of a (dense, KJT) batch, each as its own batch of one."""
    keys, batch_size = features.keys(), features.stride()
    lengths = features.lengths().view(len(keys), batch_size)
    starts = (torch.cumsum(features.lengths(), 0) - features.lengths()).view(len(keys), batch_size)
    values = features.values()
    rows = []
    for row in range(min(count, batch_size)):
        bags = [values[starts[f, row]: starts[f, row] + lengths[f, row]] for f in range(len(keys))]
        rows.append((dense[row: row + 1].clone(),
                     KeyedJaggedTensor(keys=keys, values=torch.cat(bags), lengths=lengths[:, row].clone(), stride=1)))
    return rows


def plain_inputs(
    dense: torch.Tensor, features: KeyedJaggedTensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, KJT) as the torch-only artifact's (dense, example-major ids, offsets)."""
    from recsys_kd.export.serving import example_major_inputs

    ids, offsets = example_major_inputs(features.values(), features.lengths(), features.stride(), len(features.keys()))
    return dense, ids, offsets


# ------------------------------------------------------------------------------------------ variants


def torch_only(storage: str) -> Callable[[nn.Module, Any], nn.Module]:
    """The project's artifact builder (fused table stored as ``storage``): ``(model, schema) -> scripted``."""

    def build(model: nn.Module, schema: Any) -> nn.Module:
        from recsys_kd.export.serving import ServingModel, script_serving

        return script_serving(ServingModel.from_model(model, len(schema.dense), storage=storage), roundtrip=False)
    return build


def torchrec_ebc(model: nn.Module, schema: Any) -> nn.Module:
    """The model scripted as it is: torchrec EBC, KJT input."""
    return torch.jit.script(Probabilities(copy.deepcopy(model)).eval())


def torchrec_tbe(dtype: torch.dtype) -> Callable[[nn.Module, Any], nn.Module]:
    """torchrec's inference path with ``dtype`` table weights: quantized EBC (fbgemm TBE), fx-traced, scripted."""

    def build(model: nn.Module, schema: Any) -> nn.Module:
        import torchrec.fx
        from torchrec.inference.modules import quantize_inference_model

        quantized = quantize_inference_model(TableBatchedServing(model).eval(), quantization_dtype=dtype)
        return torch.jit.script(torchrec.fx.symbolic_trace(quantized, leaf_modules=[type(model.head).__name__]))
    return build


VARIANTS: Dict[str, Tuple[str, Callable[[nn.Module, Any], nn.Module]]] = {
    "torch-only fp32 (default)": ("plain", torch_only("float32")),
    "torch-only int8": ("plain", torch_only("int8")),
    "torchrec EBC fp32": ("kjt", torchrec_ebc),
    "torchrec TBE fp32": ("kjt", torchrec_tbe(torch.float32)),
    "torchrec TBE int8": ("kjt", torchrec_tbe(torch.int8)),
}


def saved(module: nn.Module, path: Path) -> nn.Module:
    """Saves ``module`` and returns it loaded back (what a server would run)."""
    torch.jit.save(module, str(path))
    return torch.jit.load(str(path))


def fbgemm_ops(path: Path) -> List[str]:
    """The ``fbgemm::`` ops referenced by the TorchScript code inside an artifact."""
    with zipfile.ZipFile(path) as archive:
        code = "".join(archive.read(name).decode() for name in archive.namelist() if name.endswith(".py"))
    return sorted(set(re.findall(r"ops\.fbgemm\.(\w+)", code)))


def loads_with(path: Path) -> str:
    """What a fresh process needs to ``torch.jit.load`` the artifact: torch alone, or torch + fbgemm_gpu."""
    done = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(path)], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or f"fails: {done.stderr.strip().splitlines()[-1]}"


# ------------------------------------------------------------------------------------------- report


def build_all(
    models: List[Model], batch_size: int, workdir: Path
) -> Tuple[List[Dict[str, Any]], List[Any], List[Any], List[Any]]:
    """Every variant of every model, saved under ``workdir`` and loaded back, with its inputs (the same
    rows for all) and its agreement with the training model: (entries, modules, batch-1 inputs, batches)."""
    entries, modules, singles, batches = [], [], [], []
    for label, model, schema, dataset in models:
        batch = test_batch(schema, dataset, batch_size)
        kjt_batch, kjt_singles = (batch.dense, batch.sparse), single_rows(batch.dense, batch.sparse, 1000)
        inputs = {"kjt": (kjt_batch, kjt_singles),
                  "plain": (plain_inputs(*kjt_batch), [plain_inputs(*row) for row in kjt_singles])}
        with torch.no_grad():
            reference = torch.sigmoid(model(*kjt_batch))
        for variant, (kind, build) in VARIANTS.items():
            path = workdir / f"{label.split()[1]}_{variant.split(' (')[0].replace(' ', '_')}.pt"
            module = saved(build(model, schema), path)
            with torch.no_grad():
                difference = float((module(*inputs[kind][0]) - reference).abs().max())
            entries.append({"model": label, "variant": variant, "bytes": path.stat().st_size,
                            "max_abs_diff": difference, "fbgemm_ops": fbgemm_ops(path), "loads_with": loads_with(path)})
            modules.append(module)
            batches.append(inputs[kind][0])
            singles.append(inputs[kind][1])
    return entries, modules, singles, batches


def print_table(header: List[str], rows: List[List[str]]) -> None:
    """A Markdown table: the two label columns left-aligned, the numbers right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("| " + " | ".join(cells) + " |")


def report(results: List[Dict[str, Any]], rows: int, source: str, build_seconds: float) -> None:
    """The table (speed against each model's default artifact), then what each variant needs to load."""
    print(f"# bench_serving_variants  {time.strftime('%Y-%m-%d')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  1 thread  models: {source}  timed calls per variant: batch-1 x "
          f"{results[0]['calls']}, batch {rows} x {results[0]['batch_calls']}  (build {build_seconds:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f})")
    default = {r["model"]: r for r in results if r["variant"] == next(iter(VARIANTS))}
    print_table(["model", "variant", "artifact bytes", "batch-1 p50 ms", "batch-1 p99 ms", f"batch-{rows} rows/s",
                 "vs default: p50, rows/s", "max |dp| vs model"],
                [[r["model"], r["variant"], f"{r['bytes']:,}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                  f"{r['rows_per_s']:,.0f}", f"{r['p50_ms'] / default[r['model']]['p50_ms']:.2f}x, "
                  f"{r['rows_per_s'] / default[r['model']]['rows_per_s']:.2f}x", f"{r['max_abs_diff']:.1e}"]
                 for r in results])
    print("\nloading (fresh process, torch.jit.load) and the fbgemm ops its code references:")
    for r in results[:len(VARIANTS)]:
        print(f"- {r['variant']}: {r['loads_with']}; ops: {', '.join(r['fbgemm_ops']) or 'none'}")


def run(args: argparse.Namespace, workdir: Path) -> None:
    """Builds, checks and times every variant of every model (artifacts under ``workdir``); prints the table."""
    from recsys_kd.io import atomic_write_json

    started = time.perf_counter()
    use_demo = (args.demo / "pipeline.json").exists()
    models = demo_models(args.demo) if use_demo else synthetic_models()
    entries, modules, singles, batches = build_all(models, args.batch, workdir)
    build_seconds = time.perf_counter() - started
    timings = measure(modules, singles, batches, args.calls, args.batch_calls, args.seconds)
    results = [{**entry, **timing} for entry, timing in zip(entries, timings)]
    rows = int(batches[0][0].shape[0])
    report(results, rows, f"demo {args.demo}" if use_demo else "synthetic", build_seconds)
    if args.json:
        atomic_write_json(args.json, {"threads": 1, "batch": rows, "demo": use_demo, "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo",
                        help="demo pipeline output (used once its pipeline.json exists)")
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: a temporary directory)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=2000, help="timed batch-1 calls per variant")
    parser.add_argument("--batch-calls", type=int, default=10, help="rounds: timed big-batch calls per variant")
    parser.add_argument("--seconds", type=float, default=6.0, help="time bound per variant (at least two rounds run)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from recsys_kd.warnings_filter import silence_third_party_warnings

    silence_third_party_warnings()
    warnings.filterwarnings("ignore", category=UserWarning)  # TorchScript's notes on torchrec's annotations
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # torchrec.fx's is_fx_tracing notice
    if args.workdir is None:
        with tempfile.TemporaryDirectory() as workdir:
            run(args, Path(workdir))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir)


if __name__ == "__main__":
    main()
