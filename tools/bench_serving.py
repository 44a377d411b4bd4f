"""Serving speed of TorchScript artifacts: batch-1 latency (p50/p99) and batch-4096 throughput, one process.

Compares teachers, the distilled student and the AFM-compressed student on the same rows, every
artifact loaded with ``torch.jit.load`` and called as a server would call it (``forward(dense, ids,
offsets)``, ``no_grad``), at ``--threads`` torch threads (default 1).

Two modes:

- ``--artifacts T.pt [T2.pt ...] S.pt C.pt --teachers N --dataset DIR``: existing artifacts (``recsys-kd
  export``), the first N of them teachers, scored on the first rows of DIR's test split (a prepared
  dataset with the artifacts' schema).
- self-contained (no ``--artifacts``): builds Criteo-shaped synthetic data (13 dense + 26 sparse
  features, 100k-row tables), trains the teachers (``--teacher-models``: DCNv2 with D = 16, 3 full cross
  layers, MLP 400-400-400; xDeepFM with CIN 200-200-200, MLP 400-400-400) and the students
  (``--student-models``: KD-DAGFM's DAGFM-outer, D = 16, 3 layers; a tiny MLP 64-32) for
  ``--train-steps`` plain Adam steps each, or fewer once ``--train-seconds`` are spent (an xDeepFM step
  at batch 1024 takes ~10 s on 2 cores; speed does not depend on quality), compresses each student's
  tables with AFM to rank ``--rank`` (DAGFM reads the field embeddings, so it keeps per-field
  up-projections; the MLP student gets them fused into its first Linear), and saves the serving
  artifacts under ``--workdir`` (reused by a rerun with the same settings).

Speed-ups are given against each teacher: throughput ratio and batch-1 p50 latency ratio. The
models are timed in turns, round by round, so that load from other processes falls on all alike; the
run stops early (after at least two rounds) once about ``--seconds`` per model are spent.

    .venv/bin/python tools/bench_serving.py [--threads 1] [--train-steps 50] [--rank 4]
    .venv/bin/python tools/bench_serving.py --artifacts t.pt s.pt c.pt --teachers 1 --dataset runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys_kd.io import atomic_write_json

Inputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def test_rows(dataset: Path, rows: int) -> pa.Table:
    """The first ``rows`` rows of the dataset's test split (read part by part until there are enough)."""
    from recsys_kd.data.schema import Schema

    tables, have = [], 0
    for relative in Schema.load(dataset).split("test").files:
        table = pq.read_table(dataset / relative)
        tables.append(table)
        have += table.num_rows
        if have >= rows:
            break
    table = pa.concat_tables(tables)
    if table.num_rows < rows:
        raise SystemExit(f"{dataset}: the test split has {table.num_rows} rows, the benchmark needs {rows}")
    return table.slice(0, rows)


def as_inputs(table: pa.Table, schema) -> Inputs:
    """Rows as the artifact's inputs (dense, example-major ids, offsets)."""
    from recsys_kd.export.score import batch_inputs

    limits = np.array([f.num_embeddings for f in schema.sparse], dtype=np.int64)
    return batch_inputs(table, schema, limits, "bench")[2]


def measure(modules: List[Any], singles: List[List[Inputs]], batches: List[Inputs], calls: int, batch_calls: int,
            seconds: float) -> List[Dict[str, Any]]:
    """Per module: p50/p99 ms of batch-1 calls (cycling through its ``singles``) and rows/s of its big
    batch (median call). The models take turns, round by round (``batch_calls`` rounds of
    ``calls / batch_calls`` batch-1 calls and one big batch each), so that load from other processes
    on a shared machine falls on all of them alike; after two rounds the run stops early once about
    ``seconds`` per model are spent."""
    per_round = -(-calls // batch_calls)
    times: List[List[float]] = [[] for _ in modules]
    batch_times: List[List[float]] = [[] for _ in modules]
    with torch.no_grad():
        for module, single, batch in zip(modules, singles, batches):  # warm-up: the first calls optimise it
            for inputs in single[:50]:
                module(*inputs)
            module(*batch)
        started = time.perf_counter()
        for round_index in range(batch_calls):
            if round_index >= 2 and time.perf_counter() - started > seconds * len(modules):
                break
            for m, (module, single, batch) in enumerate(zip(modules, singles, batches)):
                for call in range(per_round):
                    inputs = single[(round_index * per_round + call) % len(single)]
                    t = time.perf_counter()
                    module(*inputs)
                    times[m].append(time.perf_counter() - t)
                t = time.perf_counter()
                module(*batch)
                batch_times[m].append(time.perf_counter() - t)
    results = []
    for m, batch in enumerate(batches):
        times_ms = np.array(times[m]) * 1000
        results.append({
            "p50_ms": float(np.percentile(times_ms, 50)),
            "p99_ms": float(np.percentile(times_ms, 99)),
            "rows_per_s": batch[0].shape[0] / float(np.median(batch_times[m])),
            "calls": len(times[m]),
            "batch_calls": len(batch_times[m]),
        })
    return results


# ------------------------------------------------------------------------------ self-contained build


TEACHERS = {
    "dcnv2": dict(cross_layers=3, cross_type="full", mlp_layers=[400, 400, 400]),
    "xdeepfm": dict(cin_layers=[200, 200, 200], mlp_layers=[400, 400, 400]),
}
STUDENTS = {
    "dagfm_outer": dict(dagfm_layers=3),  # KD-DAGFM's student: AFM keeps per-field up-projections
    "tiny_mlp": dict(tiny_mlp_layers=[64, 32]),  # an MLP student: AFM fuses the up-projections into Linear 1
}


def build(workdir: Path, rows: int, teachers: List[str], students: List[str], train_steps: int,
          train_seconds: float, rank: int) -> Tuple[List[Dict[str, Any]], Path]:
    """Synthetic Criteo-shaped data; teacher, student and AFM-compressed student artifacts (all reused
    when a previous build had the same settings)."""
    from recsys_kd.compress import collect_statistics, compress_embeddings
    from recsys_kd.data.prepare import PrepareConfig, prepare
    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import Schema
    from recsys_kd.data.synthetic import SyntheticConfig
    from recsys_kd.models import ModelConfig, build_model

    dataset = workdir / "data"
    manifest = workdir / "artifacts" / "manifest.json"
    settings = {"rows": rows, "teachers": teachers, "students": students, "train_steps": train_steps,
                "train_seconds": train_seconds, "rank": rank}
    if manifest.exists() and json.loads(manifest.read_text())["settings"] == settings:
        return [{**entry, "path": Path(entry["path"])} for entry in json.loads(manifest.read_text())["models"]], dataset
    if not (dataset / "schema.json").exists():
        prepare(PrepareConfig(format="synthetic", output=str(dataset), overwrite=True, progress=False,
                              synthetic=SyntheticConfig(rows=rows, seed=0, min_vocab=99_998, max_vocab=99_998),
                              row_group_rows=16384))
    schema = Schema.load(dataset)
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=1024, shuffle=True), rank=0, world_size=1)
    models = [(f"teacher {name}", name, build_model(schema, ModelConfig(name=name, embedding_dim=16, **TEACHERS[name])))
              for name in teachers]
    models += [(f"student {name}", name, build_model(schema, ModelConfig(name=name, embedding_dim=16, **STUDENTS[name])))
               for name in students]
    built = []
    for label, file_name, model in models:
        started = time.perf_counter()
        steps = train(model, reader, train_steps, train_seconds)
        print(f"trained {label}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        built.append(_saved(label, model, schema, workdir / "artifacts" / f"{file_name}.pt"))
    for label, file_name, student in models[len(teachers):]:
        statistics = collect_statistics(student, reader, layers=[], max_batches=20)
        compressed = compress_embeddings(student, rank, statistics).eval()
        form = "fused" if compressed.embedding.fused else "per-field"
        built.append(_saved(f"{label} + AFM k={rank} {form}", compressed, schema,
                            workdir / "artifacts" / f"{file_name}_afm_k{rank}.pt"))
    atomic_write_json(manifest, {"settings": settings, "models": built})
    return built, dataset


def _saved(label: str, model, schema, path: Path) -> Dict[str, Any]:
    save_artifact(model, schema, path)
    return {"label": label, "path": path, "parameters": model.num_parameters()["total"],
            "flops": model.flops_per_example()}


def train(model, reader, steps: int, seconds: float) -> int:
    """Plain Adam steps on the labels (one process, unsharded tables): ``steps``, or fewer (at least one)
    once ``seconds`` are spent; leaves the model in eval mode and returns the steps taken. Serving speed
    does not depend on the weights' values; this only makes them plausible."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    batches = iter(reader)
    deadline = time.perf_counter() + seconds
    taken = 0
    while taken < steps and (taken == 0 or time.perf_counter() < deadline):
        batch = next(batches, None)
        if batch is None:
            batches = iter(reader)
            batch = next(batches)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        taken += 1
    model.eval()
    return taken


def save_artifact(model, schema, path: Path) -> None:
    """The model's serving module, scripted and frozen, with the metadata ``load_artifact`` reads."""
    from recsys_kd.data.schema import MISSING_ID, OOV_ID
    from recsys_kd.export.artifact import MODEL_FILE, SCHEMA_FILE, _input_contract
    from recsys_kd.export.serving import ServingModel, script_serving
    from recsys_kd.io import atomic_file

    serving = ServingModel.from_model(model, num_dense_inputs=len(schema.dense))
    metadata = {"model": model.name, "storage_dtype": "float32", "parameters": model.num_parameters(),
                "flops_per_example": model.flops_per_example(), "source": {"tool": "bench_serving"},
                "compression": getattr(model, "compression_log", []),
                "input": _input_contract(schema, serving, MISSING_ID, OOV_ID)}
    with atomic_file(path) as temp:
        torch.jit.save(script_serving(serving, roundtrip=False), str(temp),
                       _extra_files={SCHEMA_FILE: schema.to_json(), MODEL_FILE: json.dumps(metadata, default=str)})


# ------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, nargs="+", help="teachers, then student and compressed artifacts")
    parser.add_argument("--teachers", type=int, default=1, help="with --artifacts: how many of them are teachers")
    parser.add_argument("--teacher-models", nargs="+", default=list(TEACHERS), choices=list(TEACHERS),
                        help="self-contained: the teachers to build")
    parser.add_argument("--student-models", nargs="+", default=list(STUDENTS), choices=list(STUDENTS),
                        help="self-contained: the students to build, each also AFM-compressed")
    parser.add_argument("--dataset", type=Path, help="prepared dataset for --artifacts (its test split is scored)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--calls", type=int, default=2000, help="timed batch-1 calls per model")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batch-calls", type=int, default=10, help="rounds: timed big-batch calls per model")
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound per model (at least two rounds run)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_serving"))
    parser.add_argument("--rows", type=int, default=200_000, help="self-contained: synthetic rows")
    parser.add_argument("--train-steps", type=int, default=50, help="self-contained: training steps per model")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="self-contained: training time bound per model")
    parser.add_argument("--rank", type=int, default=4, help="self-contained: AFM rank of the student's tables")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from recsys_kd.config import from_dict
    from recsys_kd.data.schema import Schema
    from recsys_kd.export.artifact import load_artifact
    from recsys_kd.warnings_filter import silence_third_party_warnings

    silence_third_party_warnings()
    started = time.perf_counter()
    if args.artifacts:
        if args.dataset is None:
            parser.error("--artifacts needs --dataset (the prepared dataset to take rows from)")
        models, dataset, teachers = [], args.dataset, args.teachers
        for path in args.artifacts:
            metadata = load_artifact(path)[1]["model"]
            models.append({"label": path.stem, "path": path, "parameters": metadata["parameters"]["total"],
                           "flops": metadata["flops_per_example"]})
    else:
        models, dataset = build(args.workdir, args.rows, args.teacher_models, args.student_models, args.train_steps,
                                args.train_seconds, args.rank)
        teachers = len(args.teacher_models)
    build_seconds = time.perf_counter() - started

    table = test_rows(dataset, max(args.batch, 1000))
    modules, singles, batches = [], [], []
    for entry in models:
        module, metadata = load_artifact(entry["path"])
        schema = from_dict(Schema, metadata["schema"], source=str(entry["path"]))
        modules.append(module)
        singles.append([as_inputs(table.slice(i, 1), schema) for i in range(1000)])
        batches.append(as_inputs(table.slice(0, args.batch), schema))
    timings = measure(modules, singles, batches, args.calls, args.batch_calls, args.seconds)
    results = [{**entry, "path": str(entry["path"]), "mib": os.path.getsize(entry["path"]) / 2**20, **timing}
               for entry, timing in zip(models, timings)]

    print(f"# bench_serving  {time.strftime('%Y-%m-%d')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  {args.threads} thread(s)  timed calls per model: batch-1 x "
          f"{results[0]['calls']}, batch {args.batch} x {results[0]['batch_calls']}  (build {build_seconds:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f})")
    header = ["model", "params", "FLOPs/example", "artifact MiB", "batch-1 p50 ms", "batch-1 p99 ms",
              f"batch-{args.batch} rows/s"] + [f"speed-up vs {t['label'].split()[-1]} (rows/s, p50)" for t in results[:teachers]]
    rows = [[r["label"], f"{r['parameters']:,}", f"{r['flops']:,}", f"{r['mib']:.1f}", f"{r['p50_ms']:.3f}",
             f"{r['p99_ms']:.3f}", f"{r['rows_per_s']:,.0f}"]
            + [f"{r['rows_per_s'] / t['rows_per_s']:.1f}x, {t['p50_ms'] / r['p50_ms']:.1f}x" for t in results[:teachers]]
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    if args.json:
        atomic_write_json(args.json, {"threads": args.threads, "batch": args.batch, "results": results})


if __name__ == "__main__":
    main()
