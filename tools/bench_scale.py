"""Scaling of the batch stages with rows and ranks: synthetic Criteo-format logs of each size through
prepare, train (the teacher), infer, distill, compress (AFM statistics), export and score, on 1 and N
local processes.

For each size the raw TSV is written once (``write_criteo_tsv``: label, 13 integers, 26 hashed
categories) and reused for every process count. Each stage is the real command (``python -m
recsys_kd.cli <stage>``; under ``torch.distributed.run --standalone --nproc_per_node N`` for N > 1),
one torch thread per process, so a per-rank rate is a per-core rate. Per command it records:
- wall seconds (process start and imports included) and the stage's own seconds from its JSON record;
- rows: every row for prepare, infer and score (``--score-split``); for train and distill
  ``--max-steps`` steps of ``--batch-size`` rows per rank (a bounded run is a fair rate: the rate of a
  step does not depend on how many rows the split holds); their rate is the median of the metrics
  log's windows after the first (evaluation excluded); for compress the AFM statistics pass over the
  train split plus the evaluation of valid and test (no fine-tuning), all forward passes;
- rows/s per rank = rows / stage seconds / processes;
- peak RSS (MiB) of the largest process of the command (``wait4``'s rusage: the maximum over the
  command and every descendant it waited for, i.e. the largest rank).
Flat rows/s per rank and flat peak RSS across sizes mean time grows linearly with rows and memory
does not grow with them. Bytes per row of the raw logs, the prepared dataset and the soft labels are
measured from the files. The load average is printed before and after: on a shared machine the
figures are only as good as the idle cores.

    .venv/bin/python tools/bench_scale.py [--rows 1000000 10000000] [--processes 1 2]
        [--stages prepare infer distill compress score] [--max-steps 60] [--workdir runs/bench_scale]
        [--json runs/bench_scale/bench_scale.json] [--keep]

A stage needs the ones before it (infer needs the teacher, score the exported artifact): they run
and are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

STAGES = ["prepare", "train", "infer", "distill", "compress", "export", "score"]
NEEDS = {"train": "prepare", "infer": "train", "distill": "infer", "compress": "distill", "export": "distill",
         "score": "export"}
TEACHER, STUDENT = "dcnv2", "dagfm_outer"


def stages_to_run(requested: List[str]) -> List[str]:
    """The requested stages and every stage they need, in pipeline order."""
    wanted = set(requested)
    for stage in requested:
        while stage in NEEDS:
            stage = NEEDS[stage]
            wanted.add(stage)
    return [stage for stage in STAGES if stage in wanted]


def recipe(run_dir: Path, raw: Path, args: argparse.Namespace) -> Dict:
    """The demo recipe's models and preprocessing on ``raw``, every stage bounded as the bench needs."""
    bounded = {"epochs": 1, "max_steps": args.max_steps, "log_every_steps": args.log_every, "patience": 1,
               "progress": False}
    return {
        "run_dir": str(run_dir),
        "prepare": {"format": "criteo", "inputs": [str(raw)], "output": str(run_dir / "data"), "progress": False,
                    "criteo": {"integers": "bucketize"}, "ids": {"rule": "vocab", "min_count": 4},
                    "split": {"method": "random", "seed": 2022, "fractions": [0.9, 0.05, 0.05]}},
        "reader": {"batch_size": args.batch_size, "shuffle": True},
        "train": {"model": {"name": TEACHER, "embedding_dim": 16, "dense_mode": "none", "mlp_layers": [256, 256]},
                  "optim": {"embedding": "adagrad", "embedding_lr": 0.05, "lr": 0.001}, **bounded},
        "infer": {"teachers": [{"name": TEACHER, "train_output": str(run_dir / "train" / TEACHER)}], "progress": False},
        "distill": {"model": {"name": STUDENT, "embedding_dim": 16, "dense_mode": "none", "dagfm_layers": 3},
                    "init_from": str(run_dir / "train" / TEACHER / "checkpoints" / "best"),
                    "init_from_part": "embeddings", "freeze_embeddings": True, "optim": {"lr": 0.001},
                    "distill": {"teachers": [TEACHER], "loss": {"hard": 0.1, "mse": 1.0}}, **bounded},
        "compress": {"methods": ["afm"], "steps": [{"what": "embeddings", "rank": 4}], "finetune": {"epochs": 0},
                     "progress": False},
        "export": {"source": str(run_dir / "distill" / STUDENT), "output": str(run_dir / "artifacts" / f"{STUDENT}.pt")},
    }


def launch(arguments: List[str], processes: int, log: Path) -> Dict[str, float]:
    """``python -m recsys_kd.cli ARGUMENTS`` on ``processes`` local ranks, one torch thread each;
    returns wall seconds, CPU seconds (user + system of every process of the command: launcher, ranks and
    their reader threads) and the peak RSS (MiB) of its largest process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([*launcher, "-m", "recsys_kd.cli", *arguments], env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"{' '.join(arguments[:1])} on {processes} processes failed (exit {process.returncode}); "
                         f"{log}:\n{tail}")
    return {"wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def directory_bytes(path: Path, suffix: str = ".parquet") -> int:
    return sum(part.stat().st_size for part in path.rglob(f"*{suffix}"))


def window_rate(metrics_log: Path) -> Optional[float]:
    """Median samples/s (all ranks) of the training log's windows after the first (which holds the
    warm-up); None when the run logged fewer than two windows."""
    rates = [entry["samples_per_second"] for entry in map(json.loads, metrics_log.read_text().splitlines())
             if "samples_per_second" in entry]
    return statistics.median(rates[1:]) if len(rates) > 1 else None


def measure_stage(stage: str, run_dir: Path, config: Path, processes: int, args: argparse.Namespace) -> Dict:
    """Runs one stage; returns its row of the table."""
    artifact = run_dir / "artifacts" / f"{STUDENT}.pt"
    if stage == "score":
        arguments = ["score", str(artifact), str(run_dir / "data"), str(run_dir / "scores"), "--split",
                     args.score_split, "--batch-size", str(args.batch_size), "--threads", "1", "--overwrite"]
    else:
        arguments = [stage, "--config", str(config)]
    measured = launch(arguments, processes if stage != "export" else 1, run_dir / f"{stage}.log")
    rows, seconds, extra = 0, None, {}
    if stage == "prepare":
        record = json.loads((run_dir / "data" / "prepare.json").read_text())
        rows, seconds = sum(record["rows"].values()), record["seconds"]
        extra = {"dataset_bytes_per_row": round(directory_bytes(run_dir / "data") / rows, 1)}
    elif stage in ("train", "distill"):
        output = run_dir / stage / (TEACHER if stage == "train" else STUDENT)
        record = json.loads((output / "train.json").read_text())
        rate = window_rate(output / "metrics.jsonl") or record["samples_per_second_this_run"]
        rows = record["steps"] * args.batch_size * processes
        seconds = rows / rate
        extra = {"steps": record["steps"], "loop_seconds_with_eval": record["train_seconds_this_run"]}
    elif stage == "infer":
        record = json.loads((run_dir / "soft_labels" / "infer.json").read_text())
        rows, seconds = record["rows_scored_this_run"], record["seconds_this_run"]
        extra = {"soft_label_bytes_per_row": round(directory_bytes(run_dir / "soft_labels") / rows, 2)}
    elif stage == "compress":
        record = json.loads(next((run_dir / "compress").rglob("compress_step.json")).read_text())
        schema = json.loads((run_dir / "data" / "schema.json").read_text())
        evaluated = sum(schema["splits"][split]["rows"] for split in ("valid", "test"))
        rows, seconds = record["statistics_rows"] + evaluated, record["seconds"]
        extra = {"statistics_rows": record["statistics_rows"], "evaluated_rows": evaluated}
    elif stage == "score":
        record = json.loads((run_dir / "scores" / "score.json").read_text())
        rows, seconds = record["rows"], record["seconds"]
    if stage == "export":
        processes = 1
    rate = rows / seconds / processes if rows and seconds else None
    return {"stage": stage, "rows": rows, "processes": processes, **measured,
            "stage_seconds": round(seconds, 2) if seconds else None,
            "rows_per_second_per_rank": round(rate, 1) if rate else None, **extra}


def raw_logs(workdir: Path, rows: int) -> Dict:
    """The synthetic Criteo TSV of ``rows`` lines, written once per size."""
    from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv

    raw = workdir / f"criteo_{rows}.txt"
    started = time.perf_counter()
    if not raw.exists():
        write_criteo_tsv(SyntheticConfig(rows=rows, seed=0), raw, progress=False)
    return {"path": raw, "bytes_per_row": round(raw.stat().st_size / rows, 1),
            "synthesize_seconds": round(time.perf_counter() - started, 1)}


def print_row(row: Dict) -> None:
    rate = f"{row['rows_per_second_per_rank']:,.0f}" if row["rows_per_second_per_rank"] else "-"
    stage_seconds = f"{row['stage_seconds']:.1f}" if row["stage_seconds"] else "-"
    print(f"{row['stage']:9} {row['rows']:>11,} {row['processes']:>5} {row['wall_seconds']:>8.1f} {row['cpu_seconds']:>8.1f} "
          f"{stage_seconds:>8} {rate:>12} {row['peak_rss_mib']:>9,.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="dataset sizes")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="local ranks per run")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["prepare", "infer", "distill", "compress", "score"])
    parser.add_argument("--max-steps", type=int, default=60, help="steps of train and distill at every size")
    parser.add_argument("--log-every", type=int, default=10, help="steps per rate window of train and distill")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per rank per batch")
    parser.add_argument("--score-split", default="train", help="the split score reads")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_scale"))
    parser.add_argument("--json", type=Path, help="default: <workdir>/bench_scale.json")
    parser.add_argument("--keep", action="store_true", help="keep each run's outputs (default: removed after it)")
    args = parser.parse_args()
    stages = stages_to_run(args.stages)
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average_before": [round(x, 2) for x in os.getloadavg()]},
              "settings": {"rows": args.rows, "processes": args.processes, "stages": stages, "max_steps": args.max_steps,
                           "batch_size": args.batch_size, "score_split": args.score_split, "torch_threads": 1},
              "sizes": [], "results": []}
    print(f"{os.cpu_count()} CPUs, load average {report['machine']['load_average_before']}; stages {', '.join(stages)}")
    print(f"{'stage':9} {'rows':>11} {'procs':>5} {'wall s':>8} {'cpu s':>8} {'stage s':>8} {'rows/s/rank':>12} {'peak MiB':>9}")
    for rows in args.rows:
        raw = raw_logs(args.workdir, rows)
        report["sizes"].append({"rows": rows, "raw_bytes_per_row": raw["bytes_per_row"],
                                "synthesize_seconds": raw["synthesize_seconds"]})
        for processes in args.processes:
            run_dir = args.workdir / f"rows{rows}_procs{processes}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            config = run_dir / "recipe.yaml"
            config.write_text(yaml.safe_dump(recipe(run_dir, raw["path"], args), sort_keys=False))
            for stage in stages:
                row = {"size": rows, **measure_stage(stage, run_dir, config, processes, args),
                       "load_average": round(os.getloadavg()[0], 2)}
                report["results"].append(row)
                print_row(row)
            if not args.keep:
                shutil.rmtree(run_dir)
        if not args.keep:
            raw["path"].unlink()
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = args.json or args.workdir / "bench_scale.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"load average after {report['machine']['load_average_after']}; wrote {path}")


if __name__ == "__main__":
    main()
