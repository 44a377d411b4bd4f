"""Chaos report: faults injected into every stage, bad inputs, fuzzed raw logs, corrupted files,
planted code and a server under load with slow clients, each counted as survived / handled / detected,
printed as one table.

    .venv/bin/python tools/chaos.py --report [--kills 3] [--seed 2026] [--workdir /tmp/recsys_kd_chaos]

The long version of ``tests/faults/`` (which runs one kill per stage, each bad input and a short fuzz
in the default suite): several kills per stage at random ranks and points (2 processes), every
bad-input case, 1,500 fuzzed files per raw format (a fuzzed line that escapes, or is neither converted
nor quarantined, fails its format), a few hundred single-byte flips.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT), str(PROJECT / "tools")]


def kills(workdir: Path, per_stage: int, rng: random.Random) -> Dict[str, Any]:
    from tests.faults import scenarios

    scenarios.references(workdir)
    outcomes = [scenarios.kill_and_rerun(workdir, stage, rng) for stage in scenarios.STAGES for _ in range(per_stage)]
    for outcome in outcomes:
        print(f"  kill {outcome.stage:9s} rank {outcome.rank} at {outcome.index:3d}: killed {outcome.killed}, "
              f"same result {outcome.same_result}, partial files {len(outcome.partial_files)}, "
              f"rows lost {outcome.rows_lost}, duplicated {outcome.rows_duplicated}", flush=True)
    injected = [o for o in outcomes if o.killed]
    survived = [o for o in injected if o.same_result and not o.partial_files and not o.rows_lost and not o.rows_duplicated]
    return {"injected": len(injected), "survived": len(survived), "rows_lost": sum(o.rows_lost for o in outcomes),
            "rows_duplicated": sum(o.rows_duplicated for o in outcomes),
            "partial_files": sum(len(o.partial_files) for o in outcomes)}


def pytest_cases(paths: List[str], *options: str, env: Optional[Dict[str, str]] = None) -> Dict[str, int]:
    """Runs test files of ``tests/faults`` (each test one bad input, or one fuzzed format) in a fresh
    process; returns how many ran and passed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", *options, *paths]
    result = subprocess.run(command, cwd=PROJECT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if failed:
        print("\n".join(line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))))
    return {"tried": counts.get("passed", 0) + failed, "passed": counts.get("passed", 0), "failed": failed}


def bad_inputs() -> Dict[str, int]:
    cases = pytest_cases(["tests/faults/test_bad_inputs.py", "tests/faults/test_run_faults.py"])
    print(f"  bad inputs: {cases['tried']} cases, {cases['passed']} handled with one line", flush=True)
    return cases


def fuzz(workdir: Path, seed: int) -> Dict[str, int]:
    """The long fuzz run of every raw format (``-m slow``); counts the lines its examples fed the parsers."""
    tally = workdir / "fuzz_tally.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    tally.unlink(missing_ok=True)
    cases = pytest_cases(["tests/faults/test_fuzz_parsers.py"], "-m", "slow", f"--hypothesis-seed={seed}",
                         env={"RECSYS_KD_FUZZ_TALLY": str(tally)})
    lines = sum(int(n) for n in tally.read_text().split()) if tally.exists() else 0
    print(f"  fuzz: {lines:,} lines over {cases['tried']} formats, {cases['failed']} failing", flush=True)
    return {"lines": lines, "failed_formats": cases["failed"], "formats": cases["tried"]}


def flip(path: Path, rng: random.Random) -> Callable[[], None]:
    """Flips one byte of ``path`` at a random offset; returns what restores it."""
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    original = data[offset]
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return lambda: path.write_bytes(bytes(data[:offset]) + bytes([original]) + bytes(data[offset + 1:]))


def corruptions(workdir: Path, flips: int, rng: random.Random) -> Dict[str, Any]:
    """Single-byte flips in a prepared part, a soft-label part, a checkpoint file and an artifact: each is
    read as a stage would read it, and counts as detected when the read refuses it."""
    from recsys_kd.data import integrity
    from recsys_kd.data.reader import ParquetReader, ReaderConfig
    from recsys_kd.data.side_inputs import verify_alignment
    from recsys_kd.export.artifact import load_artifact
    from recsys_kd.runs import TrainOutput
    from recsys_kd.train import checkpoint

    data, soft, teacher = workdir / "data", workdir / "soft_labels", TrainOutput(workdir / "teacher")

    def read_dataset() -> None:
        for _ in ParquetReader(data, "train", ReaderConfig(batch_size=4096), 0, 1):
            pass

    targets = {
        "dataset part": (sorted((data / "train").glob("*.parquet"))[0], read_dataset),
        "soft-label part": (sorted((soft / "train").glob("*.parquet"))[0], lambda: verify_alignment(data, soft)),
        "checkpoint file": (next(teacher.best.glob("*.distcp")), lambda: checkpoint.load_model(teacher)),
        "artifact": (workdir / "teacher.pt", lambda: load_artifact(workdir / "teacher.pt")),
    }
    detected: Dict[str, int] = {}
    for kind, (path, read) in targets.items():
        detected[kind] = 0
        for _ in range(flips):
            restore = flip(path, rng)
            integrity.forget()
            try:
                read()
            except Exception:  # refused: what verification is for
                detected[kind] += 1
            finally:
                restore()
                integrity.forget()
    for kind, count in detected.items():
        print(f"  {kind}: {count} of {flips} flips detected", flush=True)
    return {"corrupted": flips * len(targets), "detected": sum(detected.values())}


def planted_code(workdir: Path) -> Dict[str, Any]:
    """A pickle payload planted as a checkpoint's .metadata (checksums rewritten to match, as an
    attacker would) and inside an artifact: loading must refuse both and run neither."""
    from recsys_kd.export.artifact import load_artifact
    from recsys_kd.io import file_crc32
    from recsys_kd.runs import TrainOutput
    from recsys_kd.train import checkpoint

    marker = workdir / "PWNED"
    marker.unlink(missing_ok=True)

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    planted = workdir / "planted"
    shutil.rmtree(planted, ignore_errors=True)
    shutil.copytree(workdir / "teacher", planted)
    best = TrainOutput(planted).best
    (best / ".metadata").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((best / checkpoint.MANIFEST).read_text())
    manifest["files"][".metadata"] = {"crc32": file_crc32(best / ".metadata"), "bytes": (best / ".metadata").stat().st_size}
    (best / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    attempts, refused = 0, 0
    for load in (lambda: checkpoint.load_model(TrainOutput(planted)),
                 lambda: checkpoint.load_model(TrainOutput(planted), verify=False)):
        attempts += 1
        try:
            load()
        except Exception:  # refused
            refused += 1
    evil = workdir / "evil.pt"
    evil.write_bytes(pickle.dumps(Payload()))
    attempts += 1
    try:
        load_artifact(evil, verify=False)
    except Exception:  # refused
        refused += 1
    executions = int(marker.exists())
    print(f"  planted payloads: {attempts} loads, {refused} refused, code ran {executions} time(s)", flush=True)
    return {"attempts": attempts, "refused": refused, "executions": executions}


def load(workdir: Path, seconds: float) -> Dict[str, Any]:
    from load_test import measure

    figures = measure(None, workdir / "teacher.pt", workdir / "load", clients=16, slow_clients=8, slow_interval=1.0,
                      seconds=seconds, batch=1, timeout=30.0, server_options={"request_timeout": 2.0})
    print(f"  load: {figures['sent']} requests, {figures['errors']} errors, p50 {figures['p50_ms']:.1f} ms, "
          f"p99 {figures['p99_ms']:.1f} ms, slow clients cut after {max(figures['slow_held_s'], default=0):.1f} s",
          flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="run everything and print the table")
    parser.add_argument("--kills", type=int, default=3, help="kills per stage")
    parser.add_argument("--flips", type=int, default=50, help="single-byte flips per kind of file")
    parser.add_argument("--load-seconds", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recsys_kd_chaos")
    args = parser.parse_args()
    if not args.report:
        parser.error("nothing to do: pass --report")
    from recsys_kd.warnings_filter import silence_third_party_warnings
    from tests.faults import scenarios

    silence_third_party_warnings()
    rng = random.Random(args.seed)
    started = time.time()
    if not (args.workdir / "teacher.pt").exists():
        shutil.rmtree(args.workdir, ignore_errors=True)
        scenarios.make_workspace(args.workdir)
    print("kills", flush=True)
    killed = kills(args.workdir, args.kills, rng)
    print("bad inputs", flush=True)
    handled = bad_inputs()
    print("fuzz", flush=True)
    fuzzed = fuzz(args.workdir, args.seed)
    print("corruption", flush=True)
    corrupted = corruptions(args.workdir, args.flips, rng)
    print("planted code", flush=True)
    code = planted_code(args.workdir)
    print("load", flush=True)
    served = load(args.workdir, args.load_seconds)
    rows = [
        ("SIGKILLs (5 stages, 2 ranks; score 1) / survived", f"{killed['injected']} / {killed['survived']}"),
        ("rows lost / duplicated after reruns", f"{killed['rows_lost']} / {killed['rows_duplicated']}"),
        ("partial files under a final name", str(killed["partial_files"])),
        ("bad-input cases tried / handled with a one-line error", f"{handled['tried']} / {handled['passed']}"),
        ("fuzzed raw lines (5 formats) / formats with an escape", f"{fuzzed['lines']:,} / {fuzzed['failed_formats']}"),
        ("corrupted files / detected", f"{corrupted['corrupted']} / {corrupted['detected']}"),
        ("planted code loads / executions", f"{code['attempts']} / {code['executions']}"),
        ("requests (16 clients + 8 slow) / errors", f"{served['sent']:,} / {served['errors']}"),
        ("latency p50 / p99 ms", f"{served['p50_ms']:.1f} / {served['p99_ms']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nchaos report (seed {args.seed}, {time.time() - started:.0f} s, {time.strftime('%Y-%m-%d')})")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
