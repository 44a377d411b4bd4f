"""Trains several models on one recipe's dataset over several seeds; prints test AUC / logloss.

Each (model, seed) is an ordinary ``recsys-kd train`` run (same recipe; ``train.model.name``,
``train.seed`` and ``reader.seed`` overridden: a seed draws the initialisation and the shuffle
order; output ``<run_dir>/compare/<model>/seed_<s>``), so its record and checkpoints stay on disk.
A finished run of the same config is reused; one of another config is an error naming it (use
``--tag`` or another ``run_dir``). Overrides go before ``--models``, which takes every name after it:

    .venv/bin/python tools/compare_models.py -c configs/movielens.yaml --models lr fm dcn dcnv2 xdeepfm --seeds 1 2 3 \
        --peers movielens-100k
    .venv/bin/python tools/compare_models.py train.optim.lr=0.003 -c configs/movielens.yaml --models dnn --tag lr3e-3

Prints, per model, the test AUC mean ± sample std over the seeds and, with ``--peers``, the peer
figure on that split beside it (``tools/peers.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--peers", help="print the peer figures of this split beside ours (tools/peers.py)")
    parser.add_argument("--tag", default="", help="a variant's name: its runs go under compare/<tag>/, apart from "
                        "the runs of other overrides")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    args = parser.parse_args()
    from kd_experiments import load_seeded_recipe, train_once
    from peers import peer

    peer(args.peers, "")  # an unknown split fails before any training

    from recsys_kd.warnings_filter import silence_third_party_warnings

    silence_third_party_warnings()
    rows = []
    for name in args.models:
        results = []
        for seed in args.seeds:
            recipe = load_seeded_recipe(args.config, args.overrides, seed, f"train.model.name={name}",
                                        "train.progress=false")
            output = Path(recipe.run_dir) / "compare" / args.tag / name / f"seed_{seed}"
            # a finished run of the same config is reused; one of another config is an error naming it
            record = train_once(recipe.train, output, Path(recipe.prepare.output), recipe.reader)
            results.append(record)
            print(f"{name} seed {seed}: valid auc {record['best_valid']:.4f} test auc {record['test']['auc']:.4f} logloss {record['test']['logloss']:.4f}",
                  flush=True)
        valid = [r["best_valid"] for r in results]
        aucs = [r["test"]["auc"] for r in results]
        losses = [r["test"]["logloss"] for r in results]
        rows.append({
            "model": name,
            "valid AUC mean": f"{statistics.mean(valid):.5f}",
            "test AUC mean ± std": f"{statistics.mean(aucs):.4f} ± {statistics.stdev(aucs) if len(aucs) > 1 else 0.0:.4f}",
            "min-max": f"{min(aucs):.4f}-{max(aucs):.4f}",
            **({"peer test AUC": peer(args.peers, name)} if args.peers else {}),
            "test logloss": f"{statistics.mean(losses):.4f}",
            "params": f"{results[0]['parameters']['total']:,}",
            "FLOPs/example": f"{results[0]['flops_per_example']:,}",
            "train samples/s": f"{statistics.mean(r['samples_per_second_this_run'] for r in results):,.0f}",
        })
    from recsys_kd.cli import format_table

    print(f"\n# {args.config} seeds {args.seeds}  {time.strftime('%Y-%m-%d')}  {platform.machine()} "
          f"{os.cpu_count()} cores")
    print(format_table(rows))


if __name__ == "__main__":
    main()
