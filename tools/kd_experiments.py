"""Runs distillation recipes over seeds; prints and saves teacher / ensemble / student results.

For each recipe and seed s, every stage is an ordinary library run whose record stays on disk; s is
every stage's ``seed`` and the reader's (``reader.seed``: the shuffle order):
- teachers: one ``train`` per ``infer.teachers`` entry (its ``name`` is the model name; the recipe's
  ``train`` section with ``train.model.name`` and ``train.seed`` overridden), at
  ``<run_dir>/compare/<model>/seed_<s>``: the layout of ``tools/compare_models.py``, so the two tools
  share runs;
- ``infer`` to ``<run_dir>/kd/<tag>/seed_<s>/soft_labels``; ``distill`` (seed s) to ``.../distill``,
  and the ``finetune`` section, when the recipe has one, to ``.../distill/<ft name>`` (``--ft-name``,
  default ``ft``: FT variants of one distilled student share its run). A ``distill.init_from``
  under a teacher's configured ``train_output`` is pointed at that teacher's seed-s run;
- the label-only baseline: the student's model trained by the recipe's ``train`` section, at
  ``<run_dir>/kd/label_only/<student model>/seed_<s>`` (shared by the variants of a recipe).

A finished run made from the same config is reused; one made from another config is an error that
names it (pick another ``run_dir`` or remove it). Tune with overrides and ``--tag`` (a variant's
name): choose on the valid AUC, which the table prints beside the test AUC.

    .venv/bin/python tools/kd_experiments.py -c configs/movielens_kd_dagfm.yaml --seeds 1 2 3
    .venv/bin/python tools/kd_experiments.py -c configs/movielens_eckd_3t.yaml --seeds 1 2 3
    .venv/bin/python tools/kd_experiments.py -c configs/movielens_kd_dagfm.yaml finetune.optim.lr=0.001 \
        --seeds 1 2 3 --ft-name ft_lr1e-3       # overrides before --seeds, which takes every number after it

Prints one table per recipe (mean and sample std over seeds) and writes it, with every run's
metrics and paths, to ``<run_dir>/kd/<tag>/results_<ft name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

_IGNORED_KEYS = ("output", "progress")  # change where and how a run reports, not what it computes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tag", default="", help="the variant's name (default: the recipe's file name)")
    parser.add_argument("--ft-name", default="ft", help="the FT variant's directory under distill/")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--peers", help="print the peer figures of this split beside ours (tools/peers.py)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key.sub=value) applied to every run")
    args = parser.parse_args()
    from peers import peer

    peer(args.peers, "")  # an unknown split fails before any training

    import torch

    from recsys_kd.warnings_filter import silence_third_party_warnings

    torch.set_num_threads(args.threads)
    silence_third_party_warnings()
    tag = args.tag or args.config.stem
    runs = [run_seed(args.config, args.overrides, tag, seed, args.ft_name) for seed in args.seeds]
    rows = summarise(runs)
    if args.peers:
        for row in rows:
            row["peer test AUC"] = peer_of_row(args.peers, row)
    from recsys_kd.cli import format_table
    from recsys_kd.io import atomic_write_json
    from recsys_kd.recipe import load_recipe

    print(f"\n# {args.config} {' '.join(args.overrides)} seeds {args.seeds}  {time.strftime('%Y-%m-%d')}  "
          f"{platform.machine()} {os.cpu_count()} cores, {args.threads} thread(s)")
    print(format_table([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]))
    output = Path(load_recipe(args.config, args.overrides).run_dir) / "kd" / tag / f"results_{args.ft_name}.json"
    atomic_write_json(output, {"config": str(args.config), "overrides": args.overrides, "tag": tag,
                               "ft_name": args.ft_name,
                               "seeds": args.seeds, "rows": rows, "runs": runs})
    print(f"\nwritten: {output}")


def load_seeded_recipe(config: Path, overrides: Sequence[str], seed: int, *settings: str) -> Any:
    """The recipe of one seed: ``seed`` is ``train.seed`` and ``reader.seed``, so it draws the
    initialisation and the shuffle order (an explicit ``reader.seed`` in ``overrides`` wins)."""
    from recsys_kd.recipe import load_recipe

    return load_recipe(config, [f"reader.seed={seed}", *overrides, f"train.seed={seed}", *settings])


def run_seed(config: Path, overrides: Sequence[str], tag: str, seed: int, ft_name: str = "ft") -> Dict[str, Any]:
    """Every stage of one recipe for one seed (reusing finished runs); returns their records' metrics."""
    from recsys_kd.distill.infer import infer
    from recsys_kd.distill.task import distill
    from recsys_kd.models.zoo import ModelConfig
    from recsys_kd.runs import TrainOutput

    recipe = load_seeded_recipe(config, overrides, seed, "train.progress=false", "infer.progress=false")
    if recipe.distill is None:
        raise SystemExit(f"{config}: no distill section")
    dataset = Path(recipe.prepare.output)
    root = Path(recipe.run_dir)
    seed_dir = root / "kd" / tag / f"seed_{seed}"

    teachers = {}
    for spec in recipe.infer.teachers:
        teacher_config = dataclasses.replace(recipe.train, model=dataclasses.replace(recipe.train.model, name=spec.name))
        teacher_output = root / "compare" / spec.name / f"seed_{seed}"
        teachers[spec.name] = train_once(teacher_config, teacher_output, dataset, recipe.reader)
        if recipe.distill.init_from.startswith(spec.train_output.rstrip("/") + "/"):
            recipe.distill.init_from = str(teacher_output) + recipe.distill.init_from[len(spec.train_output.rstrip("/")):]
        spec.train_output = str(teacher_output)
    if recipe.distill.init_from and not Path(recipe.distill.init_from).is_relative_to(root / "compare"):
        raise SystemExit(f"{config}: distill.init_from {recipe.distill.init_from} is under no teacher's train_output")

    recipe.infer.output = str(seed_dir / "soft_labels")
    infer(recipe.infer, dataset)  # finished parts are kept: a complete output costs only its checks

    distill_config = recipe.distill
    distill_config.seed, distill_config.progress = seed, False
    if distill_config.distill.scheme == "pretrain":
        distill_config.distill.soft_labels = recipe.infer.output
    distilled = train_once(distill_config, seed_dir / "distill", dataset, recipe.reader, stage=distill)

    finetuned = None
    if recipe.finetune is not None:
        recipe.finetune.seed, recipe.finetune.progress = seed, False
        recipe.finetune.init_from = str(TrainOutput(seed_dir / "distill").best)
        finetuned = train_once(recipe.finetune, seed_dir / "distill" / ft_name, dataset, recipe.reader)

    student: ModelConfig = distill_config.model
    baseline_config = dataclasses.replace(recipe.train, model=student)
    baseline = train_once(baseline_config, root / "kd" / "label_only" / student.name / f"seed_{seed}", dataset,
                          recipe.reader)

    distillation = distilled["distillation"]
    result = {
        "seed": seed,
        # every scored teacher by its own record (its best checkpoint: the logits infer wrote)
        "teachers": {name: summary(record) for name, record in teachers.items()},
        "ensemble": distillation["ensemble"],
        "distilled": summary(distilled),
        "finetuned": summary(finetuned) if finetuned is not None else None,
        "label_only": summary(baseline),
    }
    print(f"seed {seed}: " + ", ".join(
        f"{name} {entry['test']['auc']:.5f}" for name, entry in
        [*result["teachers"].items(), ("ensemble", result["ensemble"]), ("distilled", result["distilled"]),
         ("finetuned", result["finetuned"]), ("label-only", result["label_only"])] if entry is not None), flush=True)
    return result


def train_once(config, output: Path, dataset: Path, reader, stage=None) -> Dict[str, Any]:
    """``stage(config)`` (the trainer unless given: the distill stage for a student) into ``output``
    unless a finished record of the same config and reader is there; a finished record of another
    config raises SystemExit naming it."""
    from recsys_kd.config import from_dict, to_dict
    from recsys_kd.runs import TRAIN_RECORD
    from recsys_kd.train.trainer import train

    config = dataclasses.replace(config, output=str(output), progress=False)
    record_path = output / TRAIN_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        # through the dataclass, so that fields added since the run compare at their defaults
        recorded = to_dict(from_dict(type(config), record["config"], source=str(record_path)))
        # the recorded reader holds the soft-label columns the distill config asked for, as "extras"
        same_reader = _comparable(record["reader"], ("extras",)) == _comparable(to_dict(reader), ("extras",))
        if _comparable(recorded) == _comparable(to_dict(config)) and same_reader:
            return record
        raise SystemExit(f"{record_path}: made from another config or reader; remove it or use another run_dir/tag")
    return (stage or train)(config, dataset, reader)


def peer_of_row(peers: str, row: Dict[str, Any]) -> str:
    """A distilled or FT student's peer is the same method's student (``"student FT dagfm_outer"``),
    never a label-trained model of its name; every other row's is its model's."""
    from peers import peer

    if row["role"] in ("student distilled", "student FT"):
        return peer(peers, f"{row['role']} {row['model']}")
    return peer(peers, row["model"])


def _comparable(config: Dict[str, Any], ignored: Sequence[str] = _IGNORED_KEYS) -> Dict[str, Any]:
    return {key: value for key, value in config.items() if key not in ignored}


def summary(record: Dict[str, Any]) -> Dict[str, Any]:
    """A train record's model, size, valid metrics at its best evaluation, and test metrics."""
    best = [entry["valid"] for entry in record["history"] if entry["step"] == record["best_step"]]
    return {"model": record["model"], "output": record["output"], "parameters": record["parameters"],
            "flops_per_example": record["flops_per_example"], "valid": best[-1] if best else None,
            "test": record["test"], "epochs_run": record["epochs_run"]}


def summarise(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per role (each teacher, the ensemble, the distilled and FT student, the label-only
    student): valid AUC mean, test AUC mean ± std, test logloss mean, params, FLOPs, per-seed AUCs."""
    roles: List[tuple] = [(f"teacher {name}", lambda run, name=name: run["teachers"][name]) for name in runs[0]["teachers"]]
    roles += [("ensemble", lambda run: run["ensemble"]), ("student distilled", lambda run: run["distilled"]),
              ("student FT", lambda run: run["finetuned"]), ("student label-only", lambda run: run["label_only"])]
    rows = []
    for role, pick in roles:
        entries = [pick(run) for run in runs]
        if any(entry is None for entry in entries):
            continue
        test_auc = [entry["test"]["auc"] for entry in entries]
        valid_auc = [entry["valid"]["auc"] for entry in entries if entry.get("valid")]
        rows.append({
            "role": role,
            "model": entries[0].get("model", ""),
            "valid AUC": f"{statistics.mean(valid_auc):.5f}" if valid_auc else "",
            "test AUC": f"{statistics.mean(test_auc):.5f} ± {_std(test_auc):.5f}",
            "test logloss": f"{statistics.mean(entry['test']['logloss'] for entry in entries):.5f}",
            "params": f"{entries[0]['parameters']['total']:,}",
            "FLOPs/example": f"{entries[0]['flops_per_example']:,}",
            "per seed": " ".join(f"{value:.5f}" for value in test_auc),
            "_test_auc": test_auc,
            "_valid_auc": valid_auc,
        })
    return rows


def _std(values: List[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
