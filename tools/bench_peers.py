"""Peer benchmark: the same DCN trained by this project and by FuxiCTR 2.3.10, end to end with data
loading, one torch thread each and (by default) one core each: samples/s of each, the ratio, the
ratio per CPU second of the training process, and test AUC after the same training. Results go to
``<workdir>/results.json``; docs/train.md ("Peer benchmark: FuxiCTR") holds a measured table.

Two shapes:
- ``criteo``: synthetic Criteo-format logs (``recsys_kd.data.synthetic``) through the Criteo
  converter, 26 sparse fields hashed into 26 tables x 1M rows, 13 dense fields; DCN with an MLP of
  [400, 400, 400], 3 cross layers, D = 16, batch 4096, Adagrad (every table and weight). Speed over
  ``--criteo-steps`` steps after ``--warmup`` (a fraction of an epoch), then test AUC after them.
- ``movielens``: MovieLens-100K as RecBole atomic files (``--movielens DIR``), the peers' split
  (``configs/movielens.yaml``); DCN [256, 256, 256], 3 cross layers, D = 16, batch 1024, Adam lr 1e-3
  on every weight (the tables data-parallel). Speed over one epoch after ``--warmup`` steps, and test
  AUC at the best-valid of ``--epochs`` full epochs.

Same data: this project's prepared dataset is written out in FuxiCTR's own on-disk form (Parquet of
ids and values plus ``feature_map.json``, what its ``build_dataset`` makes), so both models read the
same ids; FuxiCTR reads them with its ``ParquetDataLoader`` (Ray Data), this project with its
``ParquetReader``. The one-time preparation is timed by neither. FuxiCTR runs in its own venv
(``--fuxictr-venv``; made here with pip: ``fuxictr==2.3.10``, ``polars<2``, this torch), driven by a
script this tool writes beside it: the DCN of FuxiCTR's model zoo (which the pip package does not
ship) over the package's own layers and ``BaseModel``.

    .venv/bin/python tools/bench_peers.py --movielens path/to/movielens-100k-recbole [--shapes criteo movielens]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

FUXICTR = "fuxictr==2.3.10"
SPLITS = ("train", "valid", "test")
SHAPES: Dict[str, Dict[str, Any]] = {
    "criteo": {"mlp": [400, 400, 400], "batch": 4096, "optimizer": "adagrad", "lr": 0.01, "sharding": "table_wise"},
    "movielens": {"mlp": [256, 256, 256], "batch": 1024, "optimizer": "adam", "lr": 0.001, "sharding": "data_parallel"},
}
EMBEDDING_DIM = 16
# FuxiCTR looks its optimizer up as torch.optim.<name> ("adam" alone is mapped)
FUXICTR_OPTIMIZERS = {"adam": "adam", "adagrad": "Adagrad"}
CROSS_LAYERS = 3


# ------------------------------------------------------------------------------------------ the data


def prepare_criteo(workdir: Path, rows: int, table_rows: int) -> Path:
    """Synthetic Criteo-format logs, converted with hashed ids (``table_rows`` per table)."""
    from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
    from recsys_kd.data.synthetic import SyntheticConfig, write_criteo_tsv

    dataset = workdir / "criteo" / "data"
    if (dataset / "schema.json").exists():
        return dataset
    raw = workdir / "criteo" / "raw" / "train.txt"
    if not raw.exists():
        write_criteo_tsv(SyntheticConfig(rows=rows, seed=0, max_vocab=200_000), raw)
    prepare(PrepareConfig(format="criteo", inputs=[str(raw)], output=str(dataset), overwrite=True,
                          ids=IdConfig(rule="hash", num_embeddings=table_rows), row_group_rows=65536))
    return dataset


def prepare_movielens(workdir: Path, source: Path) -> Path:
    """ML-100K with the recipe of ``configs/movielens.yaml`` (vocabulary ids, the peers' split), without
    its multi-hot genres field: the peers' 7 single-id fields."""
    from recsys_kd.data.prepare import prepare
    from recsys_kd.recipe import load_recipe

    dataset = workdir / "movielens" / "data"
    if not (dataset / "schema.json").exists():
        config = Path(__file__).resolve().parents[1] / "configs" / "movielens.yaml"
        recipe = load_recipe(config, [f"prepare.inputs=[{source}]", f"prepare.output={dataset}",
                                      "prepare.overwrite=true", "prepare.movielens.genres=false"])  # the peers' 7 fields
        prepare(recipe.prepare)
    return dataset


def write_fuxictr_dataset(dataset: Path, output: Path) -> Path:
    """The prepared dataset in FuxiCTR's form: ``{split}.parquet`` (label, dense values, sparse ids)
    and ``feature_map.json`` (each sparse field a table of the same rows, no padding row)."""
    from recsys_kd.data.schema import Schema

    schema = Schema.load(dataset)
    if (output / "feature_map.json").exists():
        return output
    output.mkdir(parents=True, exist_ok=True)
    columns = [schema.label, *schema.dense, *(feature.name for feature in schema.sparse)]
    for split in SPLITS:
        tables = [pq.read_table(dataset / part, columns=columns) for part in schema.splits[split].files]
        pq.write_table(pa.concat_tables(tables), output / f"{split}.parquet", row_group_size=65536)
    features = [{name: {"source": "", "type": "numeric"}} for name in schema.dense]
    features += [{f.name: {"source": "", "type": "categorical", "vocab_size": f.num_embeddings}} for f in schema.sparse]
    feature_map = {"dataset_id": output.name, "num_fields": len(features),
                   "total_features": sum(f.num_embeddings for f in schema.sparse), "input_length": len(features),
                   "labels": [schema.label], "features": features}
    (output / "feature_map.json").write_text(json.dumps(feature_map, indent=2))
    return output


# ------------------------------------------------------------------------------ this project's side


def run_ours(shape: str, dataset: Path, workdir: Path, args) -> Dict[str, Any]:
    """In a fresh process (one torch thread): speed, then test AUC."""
    command = [sys.executable, __file__, "--worker", shape, "--dataset", str(dataset), "--workdir", str(workdir),
               "--warmup", str(args.warmup), "--criteo-steps", str(args.criteo_steps), "--epochs", str(args.epochs),
               "--seed", str(args.seed)]
    return _run_json(command, f"recsys_kd {shape}")


def ours_worker(shape: str, dataset: Path, workdir: Path, args) -> Dict[str, Any]:
    import torch

    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.schema import Schema
    from recsys_kd.distributed import init_distributed
    from recsys_kd.models.zoo import build_model
    from recsys_kd.train.evaluation import evaluate
    from recsys_kd.train.task import LabelTask
    from recsys_kd.train.trainer import distribute, train
    from recsys_kd.warnings_filter import silence_third_party_warnings

    silence_third_party_warnings()
    torch.set_num_threads(1)
    settings = SHAPES[shape]
    config = _our_train_config(shape, workdir / "ours", args)
    ctx = init_distributed("gloo")
    torch.manual_seed(args.seed)
    # tables on the meta device: sharding materialises them (one copy of 26 x 1M x 16 floats, not three)
    model = build_model(Schema.load(dataset), config.model, embedding_device=torch.device("meta"))
    dmp, optimizer, _ = distribute(LabelTask(model), dataclasses.replace(config, deterministic_init=False), ctx)
    reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=settings["batch"], shuffle=True), 0, 1)
    steps = _timed_steps(shape, reader.num_batches(), args)
    started, cpu_started, rows = time.perf_counter(), time.process_time(), 0
    for index, batch in enumerate(reader):  # the reader's own loop: reading, decoding, batching included
        if index == args.warmup:
            started, cpu_started, rows = time.perf_counter(), time.process_time(), 0
        optimizer.zero_grad()
        loss, _ = dmp(batch)
        loss.backward()
        optimizer.step()
        rows += batch.batch_size
        if index + 1 == args.warmup + steps:
            break
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = {"samples_per_second": rows / seconds, "samples_per_cpu_second": rows / cpu_seconds, "timed_steps": steps,
              "parameters": model.num_parameters()["total"]}
    if shape == "criteo":
        test = evaluate(dmp, ParquetReader(dataset, "test", ReaderConfig(batch_size=65536), 0, 1), ctx)
        result.update(test_auc=test["auc"], trained=f"{args.warmup + steps} steps")
    else:
        shutil.rmtree(config.output, ignore_errors=True)  # a finished output would be resumed, not retrained
        record = train(config, dataset, ReaderConfig(batch_size=settings["batch"], shuffle=True))
        result.update(test_auc=record["test"]["auc"], trained=f"{args.epochs} epochs")
    return result


def _our_train_config(shape: str, output: Path, args):
    from recsys_kd.models.zoo import ModelConfig
    from recsys_kd.train.config import OptimConfig, TrainConfig
    from recsys_kd.train.sharding import ShardingConfig

    settings = SHAPES[shape]
    optimizer = settings["optimizer"]
    optim = OptimConfig(embedding="adagrad", embedding_lr=settings["lr"], dense=optimizer, lr=settings["lr"])
    # FuxiCTR's initialisation: xavier-normal Linear layers with zero biases, tables ~ N(0, 1e-4)
    model = ModelConfig(name="dcn", embedding_dim=EMBEDDING_DIM, mlp_layers=settings["mlp"], cross_layers=CROSS_LAYERS,
                        dense_mode="projected", linear_init="xavier_normal")
    return TrainConfig(model=model, optim=optim, sharding=ShardingConfig(type=settings["sharding"]), output=str(output),
                       epochs=args.epochs, patience=args.epochs, monitor="auc", seed=args.seed, progress=False)


def _timed_steps(shape: str, batches: int, args) -> int:
    """Criteo-like: ``--criteo-steps`` (a fraction of an epoch); MovieLens: the rest of the epoch."""
    wanted = args.criteo_steps if shape == "criteo" else batches - args.warmup
    if args.warmup + wanted > batches:
        raise SystemExit(f"{shape}: {args.warmup} + {wanted} steps but the epoch has {batches} batches")
    return wanted


# ----------------------------------------------------------------------------------- FuxiCTR's side


def ensure_fuxictr(venv: Path) -> Path:
    """A venv with FuxiCTR 2.3.10 (polars < 2: FuxiCTR 2.3.10 predates polars 2) and this torch."""
    import torch

    python = venv / "bin" / "python"
    stamp = venv / ".bench_peers-installed"
    wanted = f"{FUXICTR} polars<2 torch=={torch.__version__.split('+')[0]}"
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():  # run from a venv, venv makes one over the same base interpreter
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted.split()], check=True)
    stamp.write_text(wanted)
    return python


def run_fuxictr(python: Path, shape: str, data_dir: Path, workdir: Path, args) -> Dict[str, Any]:
    driver = workdir / "fuxictr_dcn.py"
    driver.write_text(FUXICTR_DRIVER)
    settings = SHAPES[shape]
    job = {"shape": shape, "data_dir": str(data_dir), "model_root": str(workdir / "fuxictr_models"),
           "batch": settings["batch"], "optimizer": FUXICTR_OPTIMIZERS[settings["optimizer"]], "lr": settings["lr"], "mlp": settings["mlp"],
           "embedding_dim": EMBEDDING_DIM, "cross_layers": CROSS_LAYERS, "warmup": args.warmup,
           "criteo_steps": args.criteo_steps, "epochs": args.epochs, "seed": args.seed}
    job_file = workdir / f"fuxictr_{shape}.json"
    job_file.write_text(json.dumps(job))
    return _run_json([str(python), str(driver), str(job_file)], f"FuxiCTR {shape}")


# Written to the work directory and run by the FuxiCTR venv's python. The DCN is FuxiCTR's model-zoo
# DCN (parallel cross network and MLP over the flattened field embeddings, one linear layer on both)
# expressed over the pip package's FeatureEmbedding, CrossNet, MLP_Block and BaseModel.
FUXICTR_DRIVER = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(1)
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import CrossNet, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel


    class DCN(BaseModel):
        def __init__(self, feature_map, embedding_dim, mlp, cross_layers, learning_rate, **kwargs):
            super().__init__(feature_map, model_id="DCN_bench", **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            width = feature_map.sum_emb_out_dim()
            self.dnn = MLP_Block(input_dim=width, output_dim=None, hidden_units=mlp, hidden_activations="ReLU",
                                 output_activation=None, dropout_rates=0, batch_norm=False)
            self.crossnet = CrossNet(width, cross_layers)
            self.fc = nn.Linear(width + mlp[-1], 1)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            emb = self.embedding_layer(self.get_inputs(inputs), flatten_emb=True)
            out = self.fc(torch.cat([self.crossnet(emb), self.dnn(emb)], dim=-1))
            return {"y_pred": self.output_activation(out)}


    job = json.load(open(sys.argv[1]))
    torch.manual_seed(job["seed"]); np.random.seed(job["seed"])
    feature_map = FeatureMap(job["data_dir"].rstrip("/").split("/")[-1], job["data_dir"])
    feature_map.load(job["data_dir"] + "/feature_map.json", {"embedding_dim": job["embedding_dim"]})
    def build():
        model = DCN(feature_map, job["embedding_dim"], job["mlp"], job["cross_layers"], job["lr"], gpu=-1,
                   optimizer=job["optimizer"], loss="binary_crossentropy", metrics=["AUC", "logloss"],
                   model_root=job["model_root"], verbose=0, monitor="AUC", monitor_mode="max",
                   early_stop_patience=job["epochs"], reduce_lr_on_plateau=False)
        os.makedirs(model.model_dir, exist_ok=True)  # where fit() saves the best weights
        return model
    paths = {split: job["data_dir"] + "/" + split + ".parquet" for split in ("train", "valid", "test")}
    train_gen, valid_gen, test_gen = RankDataLoader(feature_map, stage="both", train_data=paths["train"],
        valid_data=paths["valid"], test_data=paths["test"], batch_size=job["batch"], shuffle=True,
        data_format="parquet")
    model = build()
    model.train()
    model._max_gradient_norm = 10.0  # what fit() sets (its default) before its loop calls train_step
    batches = len(train_gen)
    steps = job["criteo_steps"] if job["shape"] == "criteo" else batches - job["warmup"]
    started, cpu_started, rows = time.perf_counter(), time.process_time(), 0
    for index, batch in enumerate(train_gen):  # its loader's own loop
        if index == job["warmup"]:
            started, cpu_started, rows = time.perf_counter(), time.process_time(), 0
        model.train_step(batch)
        rows += len(batch[feature_map.labels[0]])
        if index + 1 == job["warmup"] + steps:
            break
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = {"samples_per_second": rows / seconds, "samples_per_cpu_second": rows / cpu_seconds, "timed_steps": steps,
              "parameters": sum(p.numel() for p in model.parameters())}
    if job["shape"] == "criteo":
        result.update(test_auc=model.evaluate(test_gen)["AUC"], trained=f"{job['warmup'] + steps} steps")
    else:
        torch.manual_seed(job["seed"])
        model = build()
        model.fit(train_gen, epochs=job["epochs"], validation_data=valid_gen)  # keeps the best-valid weights
        result.update(test_auc=model.evaluate(test_gen)["AUC"], trained=f"{job['epochs']} epochs")
    print(json.dumps(result))
''')


# ------------------------------------------------------------------------------------------- running


# --core: every worker and the processes it starts (FuxiCTR's Ray data workers, this project's
# prefetch thread) share that one core; None lets each use every core.
PINNED_CORE = None


def _run_json(command, what: str) -> Dict[str, Any]:
    """Runs a worker with one thread per library (on ``PINNED_CORE`` when set); its last stdout line
    is its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    started = time.time()
    pin = (lambda: os.sched_setaffinity(0, {PINNED_CORE})) if PINNED_CORE is not None else None
    done = subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=pin)
    if done.returncode:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {what}: {result['samples_per_second']:,.0f} samples/s, test AUC {result['test_auc']:.4f} "
          f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--movielens", type=Path, help="MovieLens-100K as RecBole atomic files (ml-100k.inter/.user/.item)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_peers"))
    parser.add_argument("--fuxictr-venv", type=Path, help="default: <workdir>/fuxictr-venv")
    parser.add_argument("--criteo-rows", type=int, default=500_000, help="synthetic rows (80/10/10 split)")
    parser.add_argument("--criteo-table-rows", type=int, default=1_000_000)
    parser.add_argument("--criteo-steps", type=int, default=10, help="timed steps of the Criteo-like shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--epochs", type=int, default=3, help="MovieLens epochs before the test AUC")
    parser.add_argument("--seed", type=int, default=2022, help="seed of round 1; round r uses seed + r - 1")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of both (medians reported)")
    parser.add_argument("--core", type=int, default=0,
                        help="run each side on this one core, its data loading included (-1: every core)")
    parser.add_argument("--worker", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PINNED_CORE
    PINNED_CORE = None if args.core < 0 else args.core
    if args.worker:
        print(json.dumps(ours_worker(args.worker, args.dataset, args.workdir, args)))
        return
    if "movielens" in args.shapes and args.movielens is None:
        parser.error("--movielens DIR is needed for the movielens shape (or --shapes criteo)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    python = ensure_fuxictr(args.fuxictr_venv or args.workdir / "fuxictr-venv")
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for shape in args.shapes:
        workdir = args.workdir / shape
        workdir.mkdir(parents=True, exist_ok=True)
        if shape == "criteo":
            dataset = prepare_criteo(args.workdir, args.criteo_rows, args.criteo_table_rows)
        else:
            dataset = prepare_movielens(args.workdir, args.movielens)
        fuxictr_data = write_fuxictr_dataset(dataset, workdir / f"fuxictr_{shape}")
        results[shape] = {"recsys_kd": [], "fuxictr": []}
        seed = args.seed
        for round_ in range(args.repeats):  # alternating, so that a change of load hits both
            args.seed = seed + round_
            print(f"{shape} round {round_ + 1}/{args.repeats}: {_load()}", file=sys.stderr, flush=True)
            results[shape]["recsys_kd"].append(run_ours(shape, dataset, workdir, args))
            results[shape]["fuxictr"].append(run_fuxictr(python, shape, fuxictr_data, workdir, args))
        args.seed = seed
    print(f"# bench_peers  {time.strftime('%Y-%m-%d %H:%M %Z')}  {platform.machine()}, {os.cpu_count()} cores, "
          f"1 torch thread each, {'every core' if PINNED_CORE is None else f'pinned to core {PINNED_CORE}'}, "
          f"{args.repeats} alternating round(s): medians; {_load()} at the end")
    print(f"{'shape':10s} {'trained':>10s} {'recsys_kd samples/s':>20s} {'FuxiCTR samples/s':>18s} {'ratio':>7s} "
          f"{'ratio per CPU s':>15s} {'recsys_kd test AUC':>19s} {'FuxiCTR test AUC':>17s}")
    for shape, runs in results.items():
        ours, peer = ({key: _median(rounds, key) for key in ("samples_per_second", "samples_per_cpu_second", "test_auc")}
                      for rounds in (runs["recsys_kd"], runs["fuxictr"]))
        print(f"{shape:10s} {runs['recsys_kd'][0]['trained']:>10s} {ours['samples_per_second']:>20,.0f} "
              f"{peer['samples_per_second']:>18,.0f} {ours['samples_per_second'] / peer['samples_per_second']:>6.1f}x "
              f"{ours['samples_per_cpu_second'] / peer['samples_per_cpu_second']:>14.1f}x {_auc(runs['recsys_kd']):>19s} "
              f"{_auc(runs['fuxictr']):>17s}")
    (args.workdir / "results.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
         "load_at_end": _load(), "results": results}, indent=2))


def _median(rounds: List[Dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _auc(rounds: List[Dict[str, Any]]) -> str:
    """The median test AUC, with the range over the rounds (each round its own seed) when several."""
    values = [r["test_auc"] for r in rounds]
    spread = f" ({min(values):.4f}-{max(values):.4f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.4f}{spread}"


if __name__ == "__main__":
    main()
