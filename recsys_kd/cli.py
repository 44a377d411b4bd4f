"""The ``recsys-kd`` command: one subcommand per stage, each ``--config X.yaml [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from recsys_kd.config import ConfigError
from recsys_kd.data.quarantine import TooManyBadRows
from recsys_kd.data.schema import SchemaError
from recsys_kd.data.source import InputError
from recsys_kd.distributed import PeerFailed
from recsys_kd.export.artifact import ArtifactError, ParityError
from recsys_kd.export.compiled import CompilerMissing
from recsys_kd.runs import (COMPRESS_RECORD, PIPELINE_RECORD, REPORT_FILE, SCORE_RECORD, TRAIN_RECORD, OutputError,
                            TrainOutput, pipeline_record)
from recsys_kd.stack import StackError, check_stack
from recsys_kd.train.checkpoint import CheckpointError
from recsys_kd.train.plan import PlanError
from recsys_kd.warnings_filter import silence_third_party_warnings

# OSError: the files, disks and network around a run (not found, exists, permission, read-only, full);
# PeerFailed: another rank's error, which that rank reports in full
USER_ERRORS = (ConfigError, SchemaError, CheckpointError, OutputError, ArtifactError, ParityError, CompilerMissing,
               TooManyBadRows, InputError, PlanError, StackError, OSError, PeerFailed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    silence_third_party_warnings()
    try:
        check_stack()  # a mismatched torch/FBGEMM/TorchRec or a CPU build on a GPU machine: one line, before any work
        return args.handler(args)
    except USER_ERRORS as error:
        if os.environ.get("RECSYS_KD_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message
        print(f"recsys-kd {args.command}: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-kd",
        description="Click logs -> sharded TorchRec models -> distilled, compressed serving artifacts.",
        epilog="Set RECSYS_KD_TRACEBACK=1 to see tracebacks of input errors.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str, handler) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help, description=help)
        command.add_argument("--config", "-c", type=Path, help="recipe YAML (configs/*.yaml)")
        command.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        command.set_defaults(handler=handler)
        return command

    stage("synthesize", "write synthetic Criteo-format raw logs with planted interactions", _synthesize)
    stage("prepare", "convert raw logs to a Parquet dataset (schema.json, quarantine, record)", _prepare)
    stage("train", "train a model with sharded embeddings (1..N processes: torchrun / torchx)", _train)
    stage("infer", "score the logs with a sharded teacher ensemble; write aligned soft labels", _infer)
    stage("distill", "train a student on logs + soft labels (KD-DAGFM / ECKD), then the FT phase", _distill)
    stage("compress", "AFM/SVD low-rank compression of a trained model, sharded, each step fine-tuned", _compress)
    stage("export", "export a trained model as a TorchScript serving artifact, parity-checked", _export)
    stage("pipeline", "run every available stage from one recipe, skipping finished ones", _pipeline)
    _add_score(commands)
    _add_serve(commands)
    _add_plan(commands)
    report = commands.add_parser("report", help="write RUN_DIR/report.html (curves, AUC against size and latency, "
                                 "AFM spectra, tables) from a finished pipeline run")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the recipe's run_dir (holds pipeline.json)")
    report.set_defaults(handler=_report)
    inspect = commands.add_parser("inspect", help="print a prepared dataset's schema and splits")
    inspect.add_argument("dataset", type=Path)
    inspect.set_defaults(handler=_inspect)
    return parser


def _recipe(args):
    from recsys_kd.recipe import load_recipe

    return load_recipe(args.config, args.overrides)


def _synthesize(args) -> int:
    from recsys_kd.pipeline import synthesize

    recipe = _recipe(args)
    if recipe.synthesize is None:
        raise ConfigError(f"{args.config}: no 'synthesize' section")
    record = synthesize(recipe.synthesize, progress=recipe.prepare.progress)
    print(json.dumps(record, indent=2))
    return 0


def _prepare(args) -> int:
    from recsys_kd.data.prepare import prepare

    recipe = _recipe(args)
    record = prepare(recipe.prepare)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(format_table(_split_rows(record)))
    if record["quarantined_total"]:
        print(f"quarantined {record['quarantined_total']} rows: {record['quarantined']} "
              f"(see {Path(record['output']) / 'quarantine.jsonl'})")
    if record["dropped_by_rule"]:
        print(f"dropped by the labelling rule: {record['dropped_by_rule']}")
    print(f"{sum(record['rows'].values()):,} rows in {record['seconds']:.1f} s "
          f"({record['rows_per_second']:,.0f} rows/s) -> {record['output']}")
    return 0


def _train(args) -> int:
    from recsys_kd.train.trainer import train

    recipe = _recipe(args)
    recipe.train.output = str(recipe.train_output())
    record = train(recipe.train, Path(recipe.prepare.output), recipe.reader)
    if record["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        test = record["test"]
        print(format_table([{
            "model": record["model"], "best valid " + recipe.train.monitor: round(record["best_valid"], 5),
            "test auc": round(test["auc"], 5), "test logloss": round(test["logloss"], 5),
            "params": record["parameters"]["total"], "flops/example": record["flops_per_example"],
            "steps": record["steps"], "samples/s": round(record["samples_per_second_this_run"]),
        }]))
        print(f"record: {Path(record['output']) / TRAIN_RECORD}")
    return 0


def _infer(args) -> int:
    from recsys_kd.distill.infer import infer

    recipe = _recipe(args)
    recipe.infer.output = str(recipe.infer_output())
    record = infer(recipe.infer, Path(recipe.prepare.output))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table([
            {"teacher": name, "model": t["model"], "test auc": round((t["test"] or {}).get("auc", float("nan")), 5),
             "params": t["parameters"]["total"], "flops/example": t["flops_per_example"]}
            for name, t in record["teachers"].items()
        ]))
        print(f"{record['rows_scored_this_run']:,} rows scored in {record['seconds_this_run']:.1f} s "
              f"({record['rows_per_second_this_run']:,.0f} rows/s, peak RSS rank 0 {record['peak_rss_mib_rank0']:.0f} MiB)"
              f" -> {record['output']}")
    return 0


def _distill(args) -> int:
    from recsys_kd.distill.task import distill
    from recsys_kd.train.trainer import train

    recipe = _recipe(args)
    if recipe.distill is None:
        raise ConfigError(f"{args.config}: no 'distill' section")
    recipe.resolve_distill()
    records = [("distill", distill(recipe.distill, Path(recipe.prepare.output), recipe.reader))]
    if recipe.finetune is not None:
        records.append(("finetune", train(recipe.finetune, Path(recipe.prepare.output), recipe.reader)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table([
            {"phase": phase, "model": r["model"], "test auc": round(r["test"]["auc"], 5),
             "test logloss": round(r["test"]["logloss"], 5), "params": r["parameters"]["total"],
             "flops/example": r["flops_per_example"], "steps": r["steps"]}
            for phase, r in records
        ]))
    return 0


def _compress(args) -> int:
    from recsys_kd.compress.stage import compress
    from recsys_kd.pipeline import resolve_compress

    recipe = _recipe(args)
    if recipe.compress is None:
        raise ConfigError(f"{args.config}: no 'compress' section")
    record = compress(resolve_compress(recipe), recipe.reader)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(compress_rows(record)))
        print(f"record: {Path(record['output']) / COMPRESS_RECORD}")
    return 0


def compress_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The compress record's chains as table rows: parameters, FLOPs and AUC/logloss per stage."""
    rows = []
    for method, chain in record["chains"].items():
        for row in chain:
            rows.append({
                "method": method, "stage": row["stage"], "params": row["parameters"],
                "embedding params": row["embedding_parameters"], "flops/example": row["flops_per_example"],
                "valid auc": _round(row["valid_auc"]), "test auc": _round(row["test_auc"]),
                "test logloss": _round(row["test_logloss"]),
            })
    return rows


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 5)


def _export(args) -> int:
    from recsys_kd.export import export_artifact

    recipe = _recipe(args)
    source = recipe.export_source()
    model_name = TrainOutput(source).model_name
    record = export_artifact(source, recipe.export_output(model_name), checkpoint=recipe.export.checkpoint,
                             dtype=recipe.export.dtype, parity_rows=recipe.export.parity_rows,
                             dataset=recipe.prepare.output, format=recipe.export.format)
    print(json.dumps({key: record[key] for key in ("artifact", "model", "format", "dtype", "size_bytes", "parity",
                                                    "latency_batch1_ms")}, indent=2))
    return 0


def _add_score(commands) -> None:
    help = "batch-score a dataset split or raw logs with a serving artifact alone; predictions + AUC/logloss"
    command = commands.add_parser("score", help=help, description=help)
    command.add_argument("artifact", type=Path, help="the serving artifact (recsys-kd export)")
    command.add_argument("input", type=Path, help="a prepared dataset directory, or raw logs (file or directory)")
    command.add_argument("output", type=Path, help="directory for the prediction parts and score.json")
    command.add_argument("--split", default="test", help="dataset split to score (default: test)")
    command.add_argument("--batch-size", type=int, default=4096, help="rows per forward call (default 4096)")
    command.add_argument("--vocab", type=Path, help="raw logs with vocabulary ids: the prepared dataset directory")
    command.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    command.add_argument("--overwrite", action="store_true", help="replace a finished run in OUTPUT")
    command.add_argument("--no-progress", dest="progress", action="store_false")
    command.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip the checksum checks: the artifact against its export record, the input's "
                              "parts against their manifest (read them as they are)")
    command.set_defaults(handler=_score)


def _score(args) -> int:
    import torch

    from recsys_kd.export.score import score_dataset

    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError(f"--batch-size and --threads must be >= 1, got {args.batch_size} and {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = score_dataset(args.artifact, args.input, args.output, split=args.split, batch_size=args.batch_size,
                           vocab_dir=args.vocab, overwrite=args.overwrite, progress=args.progress, verify=args.verify)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    metrics = record["metrics"] or {}
    print(format_table([{
        "model": record["model"], "split": record["split"], "rows": record["rows"],
        "auc": round(metrics.get("auc", float("nan")), 5), "logloss": round(metrics.get("logloss", float("nan")), 5),
        "rows/s": round(record["rows_per_second"]), "quarantined": sum(record["quarantined"].values()),
    }]))
    print(f"record: {Path(record['output']) / SCORE_RECORD}")
    return 0


def _add_serve(commands) -> None:
    from recsys_kd.export.http_pool import (DEFAULT_BACKLOG, DEFAULT_MAX_CONNECTIONS, DEFAULT_QUEUE_SIZE,
                                            DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_WORKERS)
    from recsys_kd.export.batching import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_WAIT_MS
    from recsys_kd.export.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DENSE_ABS, DEFAULT_MAX_INSTANCES, DEFAULT_PORT

    help = "serve an artifact (TorchScript or .pt2) over HTTP JSON (POST /predict, GET /health) on localhost"
    command = commands.add_parser("serve", help=help, description=help)
    command.add_argument("artifact", type=Path, help="the serving artifact (recsys-kd export)")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    command.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    command.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES, help="instances per request")
    command.add_argument("--threads", type=int, default=1, help="torch threads per request (default 1)")
    command.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="handler threads (a fixed pool)")
    command.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                         help="complete requests waiting for a worker; beyond them 503 at once")
    command.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="the listen backlog")
    command.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                         help="connections still sending their request; beyond them 503 at once")
    command.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                         help="seconds from the accept for a whole request (line, headers, body); 408 past it")
    command.add_argument("--max-dense-abs", type=float, default=DEFAULT_MAX_DENSE_ABS,
                         help="bound on |dense value| when the dense transform has no range of its own")
    command.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip checking the artifact against the checksum in its export record")
    command.add_argument("--batch-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                         help="the longest a model call waits for requests being read to join its batch")
    command.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_BATCH_ROWS,
                         help="the most rows of one batched model call")
    command.set_defaults(handler=_serve)


def _port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free one); checked before the artifact is loaded."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535")
    return port


def _serve(args) -> int:
    from recsys_kd.export.server import serve

    if min(args.max_body_bytes, args.max_instances, args.threads, args.workers, args.queue_size, args.backlog,
           args.max_connections) < 1:
        raise ConfigError("--max-body-bytes, --max-instances, --threads, --workers, --queue-size, --backlog and "
                          "--max-connections must be >= 1")
    if not (args.request_timeout > 0 and args.max_dense_abs > 0) or args.batch_wait_ms < 0 or args.max_batch_rows < 1:
        raise ConfigError("--request-timeout and --max-dense-abs must be > 0, --batch-wait-ms >= 0, --max-batch-rows >= 1")
    if not args.artifact.exists():
        raise FileNotFoundError(f"artifact {args.artifact} not found")
    try:
        serve(args.artifact, host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
              max_instances=args.max_instances, threads=args.threads, workers=args.workers,
              queue_size=args.queue_size, backlog=args.backlog, max_connections=args.max_connections,
              request_timeout=args.request_timeout, max_dense_abs=args.max_dense_abs, verify=args.verify,
              batch_wait_ms=args.batch_wait_ms, max_batch_rows=args.max_batch_rows)
    except OSError as error:  # the address is taken or cannot be bound
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from error
    return 0


def _add_plan(commands) -> None:
    help = ("plan the recipe's model for a cluster with torchrec's planner, on the meta device at full table size: "
            "the plan, memory per rank, all-to-all bytes per step; one error line when it does not fit")
    command = commands.add_parser("plan", help=help, description=help)
    command.add_argument("--config", "-c", type=Path, help="recipe YAML (its model, optimizer and sharding)")
    command.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    command.add_argument("--world-size", type=int, required=True, help="ranks in the cluster")
    command.add_argument("--local-world-size", type=int, help="ranks per host (default: LOCAL_WORLD_SIZE, the GPUs "
                                                              "here, else world size)")
    command.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    command.add_argument("--hbm-gb", type=float, help="GiB of memory per GPU (default: this machine's GPU)")
    command.add_argument("--host-memory-gb", type=float, help="GiB of memory per host (default: this machine's)")
    command.add_argument("--batch-size", type=int, help="rows per rank per step (default: the recipe's reader.batch_size)")
    command.add_argument("--sizes", type=Path, help="size file (configs/sizes/*.yaml); default: the schema of the "
                                                    "recipe's prepared dataset (prepare.output)")
    command.add_argument("--stage", choices=("train", "distill", "finetune"), default="train",
                         help="whose model to plan (default: train)")
    command.add_argument("--torchrec-stats", action="store_true",
                         help="print torchrec's own planner statistics table first (its dry-run report)")
    command.set_defaults(handler=_plan)


def _plan(args) -> int:
    import torch

    from recsys_kd.data.schema import Schema
    from recsys_kd.train.plan import GIB, load_sizes, plan_cluster, plan_rows
    from recsys_kd.train.sharding import machine_topology

    recipe = _recipe(args)
    config = getattr(recipe, args.stage)
    if config is None:
        raise ConfigError(f"{args.config}: no {args.stage!r} section")
    schema = load_sizes(args.sizes) if args.sizes else Schema.load(Path(recipe.prepare.output))
    gib = lambda value: None if value is None else int(value * GIB)
    try:
        topology = machine_topology(
            args.world_size, torch.device(args.device), args.batch_size or recipe.reader.batch_size,
            local_world_size=args.local_world_size, hbm_bytes=gib(args.hbm_gb), host_memory_bytes=gib(args.host_memory_gb),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
    plan = plan_cluster(schema, config, topology, torchrec_stats=args.torchrec_stats)
    rows = plan_rows(plan)
    print(plan.headline(schema.name))
    print(format_table(rows["tables"]))
    print(format_table(rows["ranks"]))
    print("\n".join(plan.summary()))
    return 0


def _pipeline(args) -> int:
    from recsys_kd.pipeline import result_tables, run_pipeline

    recipe = _recipe(args)
    record = run_pipeline(recipe)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for name, stage in record["stages"].items():
        state = "skipped (up to date)" if stage.get("skipped") else "done"
        print(f"{name}: {state}")
    for rows in result_tables(record).values():
        if rows:
            print(format_table(rows))
    print(f"pipeline finished in {record['seconds']:.1f} s; record: {Path(recipe.run_dir) / PIPELINE_RECORD}")
    print(f"report: {Path(recipe.run_dir) / REPORT_FILE}")
    return 0


def _report(args) -> int:
    from recsys_kd.pipeline import result_tables
    from recsys_kd.report import write_report

    record = pipeline_record(args.run_dir)
    print(f"report: {write_report(args.run_dir, record, result_tables(record))}")
    return 0


def _inspect(args) -> int:
    from recsys_kd.data.schema import Schema

    schema = Schema.load(args.dataset)
    print(f"dataset {args.dataset}: {schema.name}, label {schema.label!r}, {len(schema.dense)} dense, "
          f"{len(schema.sparse)} sparse, extra {schema.extra}")
    print(format_table([
        {"feature": f.name, "num_embeddings": f.num_embeddings, "rule": f.id_rule.kind, "multi_hot": f.multi_hot}
        for f in schema.sparse
    ]))
    print(format_table([
        {"split": name, "rows": info.rows, "positives": info.positives, "parts": len(info.files)}
        for name, info in schema.splits.items()
    ]))
    return 0


def _split_rows(record: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [
        {"split": name, "rows": rows, "positives": record["positives"][name],
         "ctr": round(record["positives"][name] / rows, 4) if rows else 0.0}
        for name, rows in record["rows"].items()
    ]


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Rows of dicts (same keys) as an aligned plain-text table."""
    if not rows:
        return "(empty)"
    headers = list(rows[0])
    cells = [[f"{row[h]:,}" if isinstance(row[h], int) and not isinstance(row[h], bool) else str(row[h])
              for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


if __name__ == "__main__":
    sys.exit(main())
