"""Mean ± std over seeds of ``recsys-kd compress`` records: one row per method and stage.

    .venv/bin/python tools/compress_table.py runs/movielens_afm/compress/dcn/compress.json \
        runs/movielens_afm_s2023/compress/dcn/compress.json runs/movielens_afm_s2024/compress/dcn/compress.json

Every record must come from the same recipe (same methods and steps); each one's ``final`` model
(the chain's last model, chosen on valid AUC) is reported on its own row.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List

from recsys_kd.cli import format_table
from recsys_kd.runs import TrainOutput


def _mean_std(values: List[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.5f} ± {spread:.5f}"


def rows(records: List[Dict]) -> List[Dict[str, object]]:
    first = records[0]
    out = []
    for method, chain in first["chains"].items():
        for index, row in enumerate(chain):
            stage = [record["chains"][method][index] for record in records]
            if any(s["stage"] != row["stage"] for s in stage):
                raise SystemExit(f"records differ in their chains at {method} {row['stage']}")
            out.append({
                "method": method, "stage": row["stage"], "params": f"{row['parameters']:,}",
                "flops/example": f"{row['flops_per_example']:,}",
                "valid auc": _mean_std([s["valid_auc"] for s in stage]),
                "test auc": _mean_std([s["test_auc"] for s in stage]),
            })
        finals = [TrainOutput(record["final"][method]).record for record in records]
        out.append({
            "method": method, "stage": "final (chosen on valid)", "params": f"{finals[0]['parameters']['total']:,}",
            "flops/example": f"{finals[0]['flops_per_example']:,}",
            "valid auc": _mean_std([f.get("valid", {}).get("auc", f["best_valid"]) for f in finals]),
            "test auc": _mean_std([f["test"]["auc"] for f in finals]),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", type=Path, help="compress.json files, one per seed")
    args = parser.parse_args()
    records = [json.loads(path.read_text()) for path in args.records]
    print(f"{len(records)} runs")
    print(format_table(rows(records)))


if __name__ == "__main__":
    main()
