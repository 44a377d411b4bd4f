"""Serving speed of the artifacts: batch-1 latency (p50/p99), batch-4096 throughput and its share of the
machine's FLOP limit, TorchScript and compiled (AOTInductor ``.pt2``) side by side, one process.

Compares teachers, the distilled students and the AFM-compressed students on the same rows, every
artifact loaded with ``load_artifact`` and called as a server would call it (``module(dense, ids,
offsets)``, ``no_grad``), at ``--threads`` torch threads (default 1). KD-DAGFM's pairings are built by
default: DCNv2 and CrossNet (full-matrix cross network alone) teachers for the DAGFM-outer student, the
CIN teacher for the DAGFM-inner student.

Per model: FLOPs per example (the model's own count), the bytes one example gathers from the
embedding table (its rows, every field) and the head's parameter bytes (read once per call), and at
batch 4096 the share of the one-thread FLOP limit its throughput uses: FLOPs/example x rows/s over
the GEMM rate measured here first (the best of a few large ``torch.mm`` shapes at ``--threads``).
A goals block at the end compares each student with its own teachers in the same run and format.

Two modes:

- ``--artifacts T.pt [T2.pt ...] S.pt C.pt --teachers N --dataset DIR``: existing artifacts (``recsys-kd
  export``), the first N of them teachers, scored on the first rows of DIR's test split (a prepared
  dataset with the artifacts' schema).
- self-contained (no ``--artifacts``): builds Criteo-shaped synthetic data (13 dense + 26 sparse
  features, 100k-row tables), trains the teachers (``--teacher-models``: DCNv2 with D = 16, 3 full cross
  layers, MLP 400-400-400; CrossNet, 3 full cross layers alone; CIN 200-200-200 alone; optionally
  xDeepFM, CIN and MLP 400-400-400) and the students (``--student-models``: KD-DAGFM's DAGFM-outer and
  DAGFM-inner, D = 16, 3 layers; optionally a tiny MLP 64-32) for
  ``--train-steps`` plain Adam steps each, or fewer once ``--train-seconds`` are spent (an xDeepFM step
  at batch 1024 takes ~10 s on 2 cores; speed does not depend on quality), compresses each student's
  tables with AFM to rank ``--rank`` (DAGFM reads the field embeddings, so it keeps per-field
  up-projections; the MLP student gets them fused into its first Linear), and saves the serving
  artifacts under ``--workdir`` (reused by a rerun with the same settings), in each of ``--formats``
  (``torchscript``, ``aoti``: the compiled kind needs a C++ compiler and ~1-3 minutes per model).

Speed-ups are given against each teacher: throughput ratio and batch-1 p50 latency ratio. The
models are timed in turns, round by round, so that load from other processes falls on all alike; the
run stops early (after at least two rounds) once about ``--seconds`` per model are spent.

    .venv/bin/python tools/bench_serving.py [--threads 1] [--train-steps 50] [--rank 4] [--formats torchscript aoti]
    .venv/bin/python tools/bench_serving.py --artifacts t.pt s.pt c.pt --teachers 1 --dataset runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
    "crossnet": dict(cross_layers=3),  # KD-DAGFM's CrossNet teacher: the full-matrix cross network alone
    "cin": dict(cin_layers=[200, 200, 200]),  # KD-DAGFM's CIN teacher
    "xdeepfm": dict(cin_layers=[200, 200, 200], mlp_layers=[400, 400, 400]),
}
STUDENTS = {
    "dagfm_outer": dict(dagfm_layers=3),  # KD-DAGFM's student: AFM keeps per-field up-projections
    "dagfm_inner": dict(dagfm_layers=3),  # KD-DAGFM's student of the CIN teacher
    "tiny_mlp": dict(tiny_mlp_layers=[64, 32]),  # an MLP student: AFM fuses the up-projections into Linear 1
}
DEFAULT_TEACHERS = ["dcnv2", "crossnet", "cin"]
DEFAULT_STUDENTS = ["dagfm_outer", "dagfm_inner"]
OWN_TEACHERS = {"dagfm_outer": ["dcnv2", "crossnet"], "dagfm_inner": ["cin"]}  # KD-DAGFM's pairings
GOALS = {"dcnv2": 5.0, "crossnet": 3.0}  # batch-4096 throughput the DAGFM-outer student should reach, x teacher


def build(workdir: Path, rows: int, teachers: List[str], students: List[str], train_steps: int,
          train_seconds: float, rank: int, formats: List[str]) -> Tuple[List[Dict[str, Any]], Path]:
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
                "train_seconds": train_seconds, "rank": rank, "formats": formats}
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
        built += _saved(label, model, schema, workdir / "artifacts" / file_name, formats)
    for label, file_name, student in models[len(teachers):]:
        statistics = collect_statistics(student, reader, layers=[], max_batches=20)
        compressed = compress_embeddings(student, rank, statistics).eval()
        form = "fused" if compressed.embedding.fused else "per-field"
        built += _saved(f"{label} + AFM k={rank} {form}", compressed, schema,
                        workdir / "artifacts" / f"{file_name}_afm_k{rank}", formats)
    atomic_write_json(manifest, {"settings": settings, "models": built})
    return built, dataset


def _saved(label: str, model, schema, stem: Path, formats: List[str]) -> List[Dict[str, Any]]:
    """The model's artifact in each format, ``stem.pt`` / ``stem.pt2``."""
    from recsys_kd.export.compiled import SUFFIXES

    saved = []
    for kind in formats:
        started = time.perf_counter()
        path = stem.with_suffix(SUFFIXES[kind])
        sizes = save_artifact(model, schema, path, kind)
        print(f"saved {label} as {kind} in {time.perf_counter() - started:.0f} s", flush=True)
        saved.append({"label": label, "format": kind, "path": path, "parameters": model.num_parameters()["total"],
                      "flops": model.flops_per_example(), **sizes})
    return saved


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


def save_artifact(model, schema, path: Path, kind: str = "torchscript") -> Dict[str, int]:
    """The model's serving module, scripted and frozen (``torchscript``) or compiled (``aoti``), with the
    metadata ``load_artifact`` reads; returns its bytes per example and head bytes."""
    from recsys_kd.data.schema import MISSING_ID, OOV_ID
    from recsys_kd.export.artifact import MODEL_FILE, SCHEMA_FILE, _input_contract
    from recsys_kd.export.tables import serving_bytes
    from recsys_kd.export.compiled import compile_serving
    from recsys_kd.export.serving import ServingModel, script_serving
    from recsys_kd.io import atomic_file

    serving = ServingModel.from_model(model, num_dense_inputs=len(schema.dense))
    sizes = serving_bytes(serving)
    metadata = {"model": model.name, "storage_dtype": "float32", "parameters": model.num_parameters(),
                "flops_per_example": model.flops_per_example(), "source": {"tool": "bench_serving"},
                "compression": getattr(model, "compression_log", []), "artifact_format": kind,
                "serving_parameters": sizes, "input": _input_contract(schema, serving, MISSING_ID, OOV_ID)}
    extra_files = {SCHEMA_FILE: schema.to_json(), MODEL_FILE: json.dumps(metadata, default=str)}
    with atomic_file(path) as temp:
        if kind == "aoti":
            compile_serving(serving, temp, extra_files, multi_hot=any(f.multi_hot for f in schema.sparse))
        else:
            torch.jit.save(script_serving(serving, roundtrip=False), str(temp), _extra_files=extra_files)
    return {key: sizes[key] for key in ("gathered_bytes_per_example", "head_bytes")}


def gemm_rate(threads: int) -> float:
    """FLOP/s of the best of a few large single-precision ``torch.mm`` shapes at ``threads`` threads:
    the FLOP limit the models' throughput is compared with."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in ((4096, 1024, 1024), (4096, 624, 624), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - started)
        best = max(best, 2 * m * k * n / float(np.median(times)))
    return best


# ------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, nargs="+", help="teachers, then student and compressed artifacts")
    parser.add_argument("--teachers", type=int, default=1, help="with --artifacts: how many of them are teachers")
    parser.add_argument("--teacher-models", nargs="+", default=DEFAULT_TEACHERS, choices=list(TEACHERS),
                        help="self-contained: the teachers to build")
    parser.add_argument("--student-models", nargs="+", default=DEFAULT_STUDENTS, choices=list(STUDENTS),
                        help="self-contained: the students to build, each also AFM-compressed")
    parser.add_argument("--formats", nargs="+", default=["torchscript", "aoti"], choices=["torchscript", "aoti"],
                        help="self-contained: the artifact kinds to build and time side by side")
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
    parser.add_argument("--profile", nargs="*", default=None, metavar="LABEL",
                        help="after the timing, profile these models (labels; none given: the students) at batch 1 "
                             "and at the big batch: the top ops by self time, torch.profiler")
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
            sizes = metadata.get("serving_parameters", {})
            models.append({"label": path.stem, "path": path, "parameters": metadata["parameters"]["total"],
                           "flops": metadata["flops_per_example"], "format": metadata.get("artifact_format", "torchscript"),
                           "gathered_bytes_per_example": sizes.get("gathered_bytes_per_example", 0),
                           "head_bytes": sizes.get("head_bytes", 0)})
        teacher_labels = [entry["label"] for entry in models[:teachers]]
    else:
        models, dataset = build(args.workdir, args.rows, args.teacher_models, args.student_models, args.train_steps,
                                args.train_seconds, args.rank, args.formats)
        teacher_labels = [f"teacher {name}" for name in args.teacher_models]
    build_seconds = time.perf_counter() - started
    limit = gemm_rate(args.threads)

    table = test_rows(dataset, max(args.batch, 1000))
    modules, singles, batches = [], [], []
    for entry in models:
        module, metadata = load_artifact(entry["path"])
        schema = from_dict(Schema, metadata["schema"], source=str(entry["path"]))
        modules.append(module)
        singles.append([as_inputs(table.slice(i, 1), schema) for i in range(1000)])
        batches.append(as_inputs(table.slice(0, args.batch), schema))
    load_before = os.getloadavg()
    timings = measure(modules, singles, batches, args.calls, args.batch_calls, args.seconds)
    results = [{**entry, "path": str(entry["path"]), "mib": os.path.getsize(entry["path"]) / 2**20, **timing,
                "flop_share": entry["flops"] * timing["rows_per_s"] / limit}
               for entry, timing in zip(models, timings)]
    load_after = os.getloadavg()
    report(results, teacher_labels, args, limit, build_seconds, (load_before, load_after))
    if args.profile is not None:
        wanted = args.profile or [r["label"] for r in results if r["label"].startswith("student")]
        for r, module, single, batch in zip(results, modules, singles, batches):
            if r["label"] in wanted:
                profile(f"{r['label']} ({r.get('format')})", module, single, batch)
    if args.json:
        atomic_write_json(args.json, {"threads": args.threads, "batch": args.batch, "gemm_flops_per_s": limit,
                                      "load_average": [load_before, load_after], "results": results})


def report(results: List[Dict[str, Any]], teacher_labels: List[str], args: argparse.Namespace, limit: float,
           build_seconds: float, loads: Tuple[Tuple[float, ...], Tuple[float, ...]]) -> None:
    """The table (speed-ups against each teacher of the same format), then the goals block."""
    print(f"# bench_serving  {time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.machine()}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  {args.threads} thread(s)  timed calls per model: batch-1 x "
          f"{results[0]['calls']}, batch {args.batch} x {results[0]['batch_calls']}  (build {build_seconds:.0f} s; "
          f"load average {loads[0][0]:.1f} before, {loads[1][0]:.1f} after the timing)")
    print(f"# FLOP limit ({args.threads} thread(s), best large torch.mm here): {limit / 1e9:.1f} GFLOP/s")
    header = ["model", "format", "params", "FLOPs/example", "gathered B/example", "head KiB", "artifact MiB",
              "batch-1 p50 ms", "batch-1 p99 ms", f"batch-{args.batch} rows/s", "% FLOP limit"]
    header += [f"vs {label.split()[-1]} (rows/s, p50)" for label in teacher_labels]
    rows = []
    for r in results:
        row = [r["label"], r.get("format", "torchscript"), f"{r['parameters']:,}", f"{r['flops']:,}",
               f"{r.get('gathered_bytes_per_example', 0):,}", f"{r.get('head_bytes', 0) / 1024:,.0f}", f"{r['mib']:.1f}",
               f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['rows_per_s']:,.0f}", f"{100 * r['flop_share']:.1f}"]
        for label in teacher_labels:
            t = _find(results, label, r.get("format"))
            row.append("" if t is None else f"{r['rows_per_s'] / t['rows_per_s']:.1f}x, {t['p50_ms'] / r['p50_ms']:.1f}x")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    goals(results, args.batch)


def profile(label: str, module: Any, single: List[Inputs], batch: Inputs, top: int = 8) -> None:
    """The ops that take the time of 200 batch-1 calls and of 2 big-batch calls (self time, torch.profiler)."""
    with torch.no_grad():
        for name, calls in (("batch 1", [single[i % len(single)] for i in range(200)]), (f"batch {batch[0].shape[0]}", [batch] * 2)):
            module(*calls[0])
            with torch.profiler.profile() as profiler:
                for inputs in calls:
                    module(*inputs)
            events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events) / len(calls)
            parts = ", ".join(f"{e.key} {e.self_cpu_time_total / len(calls):.0f} us ({e.count // len(calls)}x)"
                              for e in events[:top])
            print(f"# profile {label}, {name}: {total:.0f} us per call (profiled): {parts}")


def _find(results: List[Dict[str, Any]], label: str, kind: Optional[str]) -> Optional[Dict[str, Any]]:
    return next((r for r in results if r["label"] == label and r.get("format") == kind), None)


def goals(results: List[Dict[str, Any]], batch: int) -> None:
    """The issue's goals, each student against its own teachers in the same run and format."""
    lines = []
    for student, teachers in OWN_TEACHERS.items():
        for r in results:
            if r["label"] != f"student {student}":
                continue
            kind = r.get("format")
            for teacher in teachers:
                t = _find(results, f"teacher {teacher}", kind)
                if t is None:
                    continue
                latency, speed = r["p50_ms"] / t["p50_ms"], r["rows_per_s"] / t["rows_per_s"]
                wanted = GOALS.get(teacher)
                lines.append(f"{kind:11s} {student} vs {teacher}: batch-1 p50 {latency:.2f}x the teacher's "
                             f"({'met' if latency <= 0.5 else 'missed'}: <= 0.5x); batch-{batch} rows/s {speed:.1f}x"
                             + (f" ({'met' if speed >= wanted else 'missed'}: >= {wanted:g}x)" if wanted else ""))
            lines.append(f"{kind:11s} {student}: {100 * r['flop_share']:.1f}% of the FLOP limit at batch {batch} "
                         f"({'met' if r['flop_share'] >= 0.3 else 'missed'}: >= 30%)")
            for c in results:
                if c["label"].startswith(f"student {student} + AFM") and c.get("format") == kind:
                    faster = c["rows_per_s"] >= r["rows_per_s"] and c["p50_ms"] <= r["p50_ms"]
                    lines.append(f"{kind:11s} {student} + AFM: rows/s {c['rows_per_s'] / r['rows_per_s']:.2f}x, "
                                 f"p50 {c['p50_ms'] / r['p50_ms']:.2f}x the uncompressed student's "
                                 f"({'met' if faster else 'missed'}: at least as fast)")
    if lines:
        print("# goals")
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()
